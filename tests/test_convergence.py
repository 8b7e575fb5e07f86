"""Training-only convergence switches: the training forward is the model's forward when they are off,
the denoising part leaks nothing into the matching queries, query groups do not see each other, the
IoU-aware class target, and a model trained with every switch on exports to Hugging Face unchanged."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert

from detrkit import Detector, build_model
from detrkit.config import TrainConfig
from detrkit.engine.convergence import (ConvergenceLoss, TrainingQueries, cell_geometry, dense_targets,
                                        encoder_losses, self_attention_mask, training_forward)
from detrkit.losses import SetCriterion
from detrkit.model.detr import BackboneFeatures, pad_images

from _train_helpers import tiny_model


def _model(**kw):
    torch.manual_seed(0)
    return build_model(tiny_model(dec_layers=2, **kw).with_classes(["a", "b", "c"])).eval()


def _features():
    """Cached-backbone-style input: two feature maps of different sizes, padded (the second has padding)."""
    g = torch.Generator().manual_seed(1)
    return BackboneFeatures(*pad_images([torch.randn(512, 3, 4, generator=g), torch.randn(512, 2, 3, generator=g)]))


def _targets():
    return [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def _close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("queries_at", ["attention", "input"])
def test_switches_off_is_the_model_forward(queries_at):
    model = _model(queries_at=queries_at)
    feats = _features()
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        for x in (feats, images):
            ours = training_forward(model, None, x, _targets())
            assert ours["dn"] is None and len(ours["groups"]) == 1
            ref = model(x)
            assert torch.equal(ours["groups"][0]["pred_logits"], ref["pred_logits"])
            assert torch.equal(ours["groups"][0]["pred_boxes"], ref["pred_boxes"])
            assert torch.equal(ours["groups"][0]["aux_outputs"][0]["pred_boxes"], ref["aux_outputs"][0]["pred_boxes"])


def test_mask_layout():
    m = self_attention_mask(num_queries=3, groups=2, dn_groups=2, dn_width=2)  # 2 x 3 matching, 2 x 2 denoising
    assert m.shape == (10, 10)
    assert not m[:3, :3].any() and m[:3, 3:].all()  # group 0 sees only itself
    assert not m[3:6, 3:6].any() and m[3:6, :3].all() and m[3:6, 6:].all()
    assert not m[6:, :3].any() and m[6:, 3:6].all()  # denoising sees group 0, never group 1
    assert not m[6:8, 6:8].any() and m[6:8, 8:].all() and m[8:, 6:8].all()  # its own dn group only
    assert not m.all(-1).any()  # every query sees something


@pytest.mark.parametrize("queries_at", ["attention", "input"])
def test_denoising_leaks_nothing_into_the_matching_queries(queries_at):
    model = _model(queries_at=queries_at)
    extra = TrainingQueries(TrainConfig(dn_groups=3), 32, 8, 3)
    feats, targets = _features(), _targets()
    with torch.no_grad():
        plain = training_forward(model, None, feats, targets)["groups"][0]
        with_dn = training_forward(model, extra, feats, targets,
                                   generator=torch.Generator().manual_seed(0))
        assert with_dn["dn"]["pred_boxes"].shape == (2, 2, 3 * 2, 4)  # 2 layers, 3 groups x 2 targets
        assert _close(with_dn["groups"][0]["pred_logits"], plain["pred_logits"])
        assert _close(with_dn["groups"][0]["pred_boxes"], plain["pred_boxes"])
        # and the denoising part does depend on the noised boxes it was given (it is not inert)
        other = training_forward(model, extra, feats, targets,
                                 generator=torch.Generator().manual_seed(1))
        assert not _close(other["dn"]["pred_boxes"], with_dn["dn"]["pred_boxes"], atol=1e-4)

        # denoising groups do not see each other: change group 2's inputs, groups 0 and 1 stay
        fixed = extra.noised(targets, torch.Generator().manual_seed(0))
        changed = [t.clone() for t in fixed]
        changed[1][:, 4:] = torch.rand(2, 2, 4)
        extra.noised = lambda *a, **k: fixed  # type: ignore[method-assign]
        a = training_forward(model, extra, feats, targets)["dn"]
        extra.noised = lambda *a, **k: changed  # type: ignore[method-assign]
        b = training_forward(model, extra, feats, targets)["dn"]
        valid = fixed[4]
        keep = valid.clone()
        keep[:, 4:] = False
        assert _close(a["pred_boxes"][:, keep], b["pred_boxes"][:, keep])
        assert not _close(a["pred_boxes"][:, :, 4:], b["pred_boxes"][:, :, 4:], atol=1e-4)


def test_crowded_images_get_fewer_denoising_groups():
    # 8 queries -> at most 16 denoising queries: 4 groups of 2 targets fit, 4 groups of 7 do not
    extra = TrainingQueries(TrainConfig(dn_groups=4), 32, 8, 3)
    assert [extra.groups_for(n) for n in (0, 1, 2, 4, 7, 16, 40)] == [4, 4, 4, 4, 2, 1, 1]
    # a budget of 1 x the queries (8): half as many groups where the budget binds, never below one
    tight = TrainingQueries(TrainConfig(dn_groups=4, dn_query_budget=1.0), 32, 8, 3)
    assert [tight.groups_for(n) for n in (0, 1, 2, 4, 7, 16)] == [4, 4, 4, 2, 1, 1]
    model = _model()
    crowded = [{"labels": torch.arange(7) % 3, "boxes": torch.rand(7, 2).mul(0.5).add(0.25).repeat(1, 2) * 0.8},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.no_grad():
        out = training_forward(model, extra, _features(), crowded, generator=torch.Generator().manual_seed(0))
    assert out["dn"]["pred_boxes"].shape == (2, 2, 2 * 7, 4)  # 2 layers, 2 images, 2 groups x 7 targets
    assert out["dn"]["valid"].sum() == 2 * 7 + 2 * 1
    # the matching queries still see none of it
    plain = training_forward(model, None, _features(), crowded)["groups"][0]
    assert _close(out["groups"][0]["pred_boxes"], plain["pred_boxes"])


def test_contrastive_negatives_answer_no_object_from_further_away():
    cfg = TrainConfig(dn_groups=3, dn_negatives=True, dn_box_noise=0.4, dn_label_noise=0.0)
    extra = TrainingQueries(cfg, 32, 8, 3)
    assert extra.dn_width(2) == 4 and extra.groups_for(2) == 3 and extra.groups_for(4) == 2  # 16-query budget
    targets = _targets()
    noisy_labels, noisy_boxes, labels, boxes, valid = extra.noised(targets, torch.Generator().manual_seed(0))
    assert labels.shape == (2, 3 * 2 * 2)  # 3 groups x (positive, negative) x 2 targets
    slots = labels.view(2, 3, 2, 2)
    assert (slots[0, :, 0] == torch.tensor([0, 2])).all() and (slots[:, :, 1] == 3).all()  # negatives: no object
    assert torch.equal(noisy_labels.view(2, 3, 2, 2)[0, :, 1], slots[0, :, 0])  # they start from the true class
    # positives are moved by at most box_noise x half the size, negatives by one to two times that
    truth = boxes.view(2, 3, 2, 2, 4)
    shift = ((noisy_boxes.view(2, 3, 2, 2, 4)[..., :2] - truth[..., :2]).abs() / (0.4 * truth[..., 2:] / 2))
    inside = valid.view(2, 3, 2, 2)[..., None].expand_as(shift) & (noisy_boxes.view(2, 3, 2, 2, 4)[..., :2] > 0)
    pos, neg = shift[:, :, 0][inside[:, :, 0]], shift[:, :, 1][inside[:, :, 1]]
    assert pos.max() <= 1 + 1e-5 and neg.min() >= 1 - 1e-5 and neg.max() <= 2 + 1e-5

    # the loss: negatives have a class term only, and the matching queries still see none of it
    model = _model()
    with torch.no_grad():
        out = training_forward(model, extra, _features(), targets, generator=torch.Generator().manual_seed(0))
        plain = training_forward(model, None, _features(), targets)["groups"][0]
    assert _close(out["groups"][0]["pred_boxes"], plain["pred_boxes"])
    loss = ConvergenceLoss(SetCriterion(3), 1.0)
    before = loss._denoising(out["dn"])
    negative = valid & (labels == 3)
    moved = dict(out["dn"], pred_boxes=out["dn"]["pred_boxes"].clone())
    moved["pred_boxes"][:, negative] = 0.5
    after = loss._denoising(moved)
    assert torch.equal(before["loss_dn_bbox"], after["loss_dn_bbox"]) and torch.equal(before["loss_dn_giou"],
                                                                                      after["loss_dn_giou"])
    logits = moved["pred_logits"].clone()
    logits[..., 3] = torch.where(negative, logits[..., 3] + 5.0, logits[..., 3])
    assert loss._denoising(dict(moved, pred_logits=logits))["loss_dn_ce"] < after["loss_dn_ce"]


def test_group_queries_do_not_attend_across_groups():
    model = _model()
    extra = TrainingQueries(TrainConfig(query_groups=3), 32, 8, 3)
    feats = _features()
    with torch.no_grad():
        out = training_forward(model, extra, feats)["groups"]
        assert len(out) == 3
        plain = model(feats)
        assert _close(out[0]["pred_boxes"], plain["pred_boxes"])
        extra.extra_queries[1].normal_()  # group 2's queries change
        again = training_forward(model, extra, feats)["groups"]
    assert _close(again[0]["pred_boxes"], out[0]["pred_boxes"]) and _close(again[1]["pred_logits"], out[1]["pred_logits"])
    assert not _close(again[2]["pred_boxes"], out[2]["pred_boxes"], atol=1e-4)


def test_iou_aware_class_target():
    """Matched boxes equal to their targets: the IoU-aware loss is the paper's cross-entropy; off by
    IoU < 1 it puts the missing share on "no object", exactly as written out by hand."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3)
    tgt = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    pred = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    plain, aware = SetCriterion(2), SetCriterion(2, iou_aware=True)
    out = {"pred_logits": logits, "pred_boxes": pred}
    assert torch.allclose(plain(out, [tgt])["loss_ce"], aware(out, [tgt])["loss_ce"])
    shifted = pred.clone()
    shifted[0, 0, 0] = 0.6  # IoU (0.3*0.4)/(0.5*0.4) = 0.6 with the target
    out = {"pred_logits": logits, "pred_boxes": shifted}
    iou = 0.6
    logp = logits[0].log_softmax(-1)
    w = torch.tensor([1.0, 0.1, 0.1])
    nll = torch.stack([-(iou * logp[0, 1] + (1 - iou) * logp[0, 2]), -logp[1, 2], -logp[2, 2]])
    assert torch.allclose(aware(out, [tgt])["loss_ce"], (w * nll).sum() / w.sum(), atol=1e-6)


def test_one_to_many_matches_each_target_several_times_in_the_early_layers_only():
    """Hybrid layers: the auxiliary layer's two queries on each target are both matched (k=2), so
    calling both "object" costs nothing there, while the last layer keeps the paper's one-to-one loss;
    crowded images are repeated only as often as the queries allow."""
    from detrkit.losses import repeat_targets

    tgt = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2],
                           [0.7, 0.7, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1]]])
    logits = torch.full((1, 5, 3), -5.0)
    logits[0, [0, 1], 0] = logits[0, [2, 3], 1] = logits[0, 4, 2] = 5.0  # confident: two copies of each, one empty
    layer = {"pred_logits": logits, "pred_boxes": boxes}
    out = {**layer, "aux_outputs": [dict(layer)]}
    plain, hybrid = SetCriterion(2)(out, [tgt]), SetCriterion(2, one_to_many=2)(out, [tgt])
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert torch.allclose(plain[k], hybrid[k]), k  # the last layer: one-to-one either way
    assert torch.allclose(plain["loss_ce_0"], plain["loss_ce"])  # one-to-one: a copy of each is wrong
    assert hybrid["loss_ce_0"] < 0.01 < plain["loss_ce_0"]
    assert float(hybrid["loss_bbox_0"]) == 0.0 and float(hybrid["cardinality_error_0"]) == 0.0
    crowded = repeat_targets([tgt, {"labels": torch.arange(3), "boxes": torch.rand(3, 4)}], k=3, num_queries=5)
    assert [len(t["labels"]) for t in crowded] == [4, 3]  # 2 x 2 (5 // 2), then 3 x 1
    assert torch.equal(crowded[0]["boxes"], tgt["boxes"].repeat(2, 1))


def test_attention_guide_counts_the_mass_inside_the_matched_box():
    """A 4x4 feature map, one target over its top-left 2x2 cells: all attention there costs nothing,
    uniform attention costs -log(4/16), and the term reaches the total at its own weight, in every layer."""
    from detrkit.engine.convergence import attention_guide_loss

    box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    inside = torch.zeros(16)
    inside[[0, 1, 4, 5]] = 0.25
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    focused = {"cross_attention": inside.expand(1, 2, 3, 16), "feature_mask": mask}
    uniform = {"cross_attention": torch.full((1, 2, 3, 16), 1 / 16), "feature_mask": mask}
    idx = torch.tensor([0]), torch.tensor([2])
    assert float(attention_guide_loss(focused, *idx, box, 1.0)["loss_attn"]) < 1e-5
    assert torch.allclose(attention_guide_loss(uniform, *idx, box, 1.0)["loss_attn"], -torch.log(torch.tensor(0.25)))
    assert attention_guide_loss({}, *idx, box, 1.0) == {}  # a layer without attention: no term
    loss = ConvergenceLoss(SetCriterion(1), attn_guide_coef=0.5)
    assert [loss.weight(k) for k in ("loss_attn", "loss_attn_1", "g1_loss_attn_0", "loss_ce")] == [0.5, 0.5, 0.5, 1.0]


def test_trained_with_every_switch_exports_to_huggingface(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model()
    cfg = TrainConfig(dn_groups=2, dn_negatives=True, query_groups=3, iou_aware=True, enc_aux_coef=1.0,
                      one_to_many=2, attn_guide_coef=1.0)
    keys_before = {k: v.shape for k, v in model.state_dict().items()}
    extra = TrainingQueries.from_config(cfg, model)
    loss_fn = ConvergenceLoss(SetCriterion.from_config(cfg, 3), cfg.dn_loss_coef, cfg.enc_aux_coef,
                              cfg.attn_guide_coef)
    params = list(model.parameters()) + list(extra.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    model.train()
    before = model.query_embed.weight.detach().clone()
    for _ in range(3):
        losses = loss_fn(training_forward(model, extra, _features(), _targets()), _targets())
        assert {"loss_dn_ce", "loss_dn_bbox", "g2_loss_giou", "loss_ce", "loss_enc_focal", "loss_enc_giou",
                "loss_attn", "g2_loss_attn"} <= set(losses)
        opt.zero_grad()
        loss_fn.total(losses).backward()
        opt.step()
    assert not torch.equal(before, model.query_embed.weight)
    assert extra.dn_box.layers[0].weight.grad is not None and extra.extra_queries.grad is not None
    assert extra.enc_head.box_head.layers[0].weight.grad is not None
    assert {k: v.shape for k, v in model.state_dict().items()} == keys_before

    out = Detector(model.eval(), model.cfg).export_huggingface(tmp_path / "hf")
    hf, info = transformers.DetrForObjectDetection.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = Detector.from_pretrained(out)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_encoder_head_targets_by_hand():
    """Cells within 1.5 cells of a centre and inside the box are positive; the centre's own cell always
    is (here a centre on a cell border, and a box smaller than a cell); padding is -1."""
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:], mask[1, :, 4:] = True, True  # image 1: 4 x 3 cells of its own
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.1, 0.125, 0.05, 0.05]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    labels, boxes = dense_targets(mask, targets, num_classes=3)
    want0 = torch.full((4, 5), 3)
    want0[1:3, 1:4] = 1  # x centres 0.3 0.5 0.7 (reach 1.5 x 0.2), y 0.375 0.625 (0.125 is exactly 0.375 away)
    want0[0, 0] = 0  # the small box: its own cell only
    want1 = torch.full((4, 5), 3)
    want1[3], want1[:, 4] = -1, -1
    want1[1, 2] = 2  # centre (0.5, 0.5) on the border of columns 1 and 2: floor(0.5 * 4) = column 2
    assert torch.equal(labels.view(2, 4, 5), torch.stack([want0, want1]))
    assert torch.equal(boxes.view(2, 4, 5, 4)[0, 1, 2], targets[0]["boxes"][0])


def test_encoder_head_loss_at_a_perfect_box_is_zero():
    """Offsets that put each positive cell's box on its target give zero L1 and GIoU."""
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.8, 0.8]])}]
    labels, boxes = dense_targets(mask, tgt, 1)
    centres, cell = cell_geometry(mask)
    offsets = torch.cat([(boxes[..., :2] - centres) / cell, (boxes[..., 2:].clamp(min=1e-3) / cell).log()], -1)
    losses = encoder_losses({"logits": torch.zeros(1, 9, 1), "offsets": offsets, "mask": mask}, tgt, 1)
    assert (labels == 0).sum() == 9  # reach min(0.4, 0.5) > 1/3 (a 0.6 box would reach 0.3: centre only)
    assert losses["loss_enc_bbox"].abs() < 1e-5 and losses["loss_enc_giou"].abs() < 1e-5
    # logits 0: p = 0.5 on all 9 positive cells, focal = alpha (1 - p)^2 ln 2 each, over 9 positives
    assert torch.allclose(losses["loss_enc_focal"], torch.tensor(0.25 * 0.25 * math.log(2)), atol=1e-6)
