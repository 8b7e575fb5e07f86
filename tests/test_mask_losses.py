"""Focal and DICE mask losses against values worked out by hand."""
import math

import pytest
import torch

from detrkit.mask_losses import dice_loss, focal_loss, mask_losses, pad_masks


def test_focal_by_hand():
    # pixel 1: target 1, p = 0.5: alpha 0.25 * (1 - 0.5)^2 * ln 2
    # pixel 2: target 0, p = 0.75: (1 - alpha) 0.75 * 0.75^2 * ln 4
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2
    assert focal_loss(logits, targets, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(logits, targets, 4.0).item() == pytest.approx(expected / 4, rel=1e-6)


def test_dice_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # mask 1: p = (0.5, 0.75): 1 - (2*0.5 + 1) / (1.25 + 1 + 1); mask 2: 1 - (2*1 + 1) / (1 + 2 + 1)
    expected = (1 - 2 / 3.25) + (1 - 3 / 4)
    assert dice_loss(logits, targets, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)
    # a confident perfect mask costs (almost) nothing
    perfect = dice_loss(torch.tensor([[20.0, -20.0]]), torch.tensor([[1.0, 0.0]]), 1.0)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)


def test_mask_losses_match_order_padding_and_upsampling():
    # two images of different sizes; image 0 has 2 targets matched to its rows 0 and 1 in the order
    # (target 1, target 0); image 1 has one target, its row 1 is padding
    t0 = torch.zeros(2, 8, 8, dtype=torch.bool)
    t0[0, :4] = True
    t0[1, 4:] = True
    t1 = torch.zeros(1, 8, 4, dtype=torch.bool)
    t1[0, :, :2] = True
    targets = [{"masks": t0}, {"masks": t1}]
    pred = torch.full((2, 2, 2, 2), -30.0)
    pred[0, 0, 1, :] = 30.0  # row 0 <-> target 1 (bottom half)
    pred[0, 1, 0, :] = 30.0  # row 1 <-> target 0 (top half)
    pred[1, 0, :, 0] = 30.0  # left half of the padded 8x8 (target 1 covers columns 0-1 of its 8x4)
    pred[1, 1] = 5.0  # padding row: must not count
    out = mask_losses(pred, targets, [torch.tensor([1, 0]), torch.tensor([0])], num_boxes=3.0)
    # the same from the three pairs assembled by hand: (row 0, target 1), (row 1, target 0), and
    # image 1's row 0 against its target zero-padded to 8x8; the padding row adds nothing
    up = torch.nn.functional.interpolate(pred.flatten(0, 1)[:, None], size=(8, 8), mode="bilinear",
                                         align_corners=False)[:, 0].view(2, 2, 64)
    t1_padded = torch.zeros(8, 8)
    t1_padded[:, :4] = t1[0].float()
    src = torch.stack([up[0, 0], up[0, 1], up[1, 0]])
    tgt = torch.stack([t0[1].float().flatten(), t0[0].float().flatten(), t1_padded.flatten()])
    assert out["loss_dice"].item() == pytest.approx(dice_loss(src, tgt, 3.0).item(), rel=1e-6)
    assert out["loss_mask"].item() == pytest.approx(focal_loss(src, tgt, 3.0).item(), rel=1e-6)
    # bilinear upsampling blurs only the boundary: a small loss
    assert out["loss_dice"].item() < 0.15
    swapped = mask_losses(pred, targets, [torch.tensor([0, 1]), torch.tensor([0])], num_boxes=3.0)
    assert swapped["loss_dice"].item() > 0.6


def test_pad_masks_and_empty_batch():
    p = pad_masks([torch.ones(1, 2, 3, dtype=torch.bool), torch.ones(2, 4, 1, dtype=torch.bool)])
    assert p.shape == (3, 4, 3) and p[0].sum() == 6 and p[1].sum() == 4
    pred = torch.zeros(1, 2, 4, 4, requires_grad=True)
    out = mask_losses(pred, [{"masks": torch.zeros(0, 8, 8, dtype=torch.bool)}], [torch.tensor([], dtype=torch.int64)], 1.0)
    assert out["loss_mask"].item() == 0 and out["loss_dice"].item() == 0
    out["loss_mask"].backward()
