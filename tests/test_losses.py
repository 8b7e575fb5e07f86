import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detrkit.config import TrainConfig
from detrkit.losses import SetCriterion
from detrkit.matching import HungarianMatcher

C, Q, L = 5, 7, 3  # classes, queries, decoder layers (-> 2 aux outputs)


def random_boxes(g, n):
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    return torch.cat([c, wh], 1)


def random_outputs(g, B):
    layers = [{"pred_logits": torch.randn(B, Q, C + 1, generator=g),
               "pred_boxes": torch.stack([random_boxes(g, Q) for _ in range(B)])} for _ in range(L)]
    return {**layers[-1], "aux_outputs": layers[:-1]}


def random_targets(g, sizes):
    return [{"labels": torch.randint(0, C, (n,), generator=g), "boxes": random_boxes(g, n)} for n in sizes]


def hf_losses(outputs, targets, eos_coef, costs, weights):
    """Hugging Face transformers' DETR loss (the reference implementation) on the same tensors."""
    from transformers.loss.loss_for_object_detection import HungarianMatcher as HFMatcher, ImageLoss

    matcher = HFMatcher(class_cost=costs[0], bbox_cost=costs[1], giou_cost=costs[2])
    loss = ImageLoss(matcher, num_classes=C, eos_coef=eos_coef, losses=["labels", "boxes", "cardinality"])
    hf_out = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
              "auxiliary_outputs": [{"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]}
                                    for a in outputs["aux_outputs"]]}
    hf_tgt = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    terms = loss(hf_out, hf_tgt)
    wd = {"loss_ce": weights[0], "loss_bbox": weights[1], "loss_giou": weights[2]}
    wd.update({f"{k}_{i}": v for i in range(L - 1) for k, v in list(wd.items())})
    return terms, sum(terms[k] * wd[k] for k in terms if k in wd)


@pytest.mark.parametrize("sizes,eos,costs,weights", [
    ([3, 1, 4], 0.1, (1, 5, 2), (1, 5, 2)),
    ([0, 2, 7, 5], 0.2, (2, 3, 1), (1.5, 4, 3)),  # as many targets as queries; an empty image
    ([9, 0], 0.1, (1, 5, 2), (1, 5, 2)),  # more targets than queries
    ([0, 0], 0.1, (1, 5, 2), (1, 5, 2)),  # nothing to match anywhere
])
def test_equals_huggingface_detr_loss(sizes, eos, costs, weights):
    g = torch.Generator().manual_seed(sum(sizes))
    outputs, targets = random_outputs(g, len(sizes)), random_targets(g, sizes)
    criterion = SetCriterion(C, HungarianMatcher(*costs), eos_coef=eos,
                             weight_dict=dict(zip(["loss_ce", "loss_bbox", "loss_giou"], weights)))
    ours = criterion(outputs, targets)
    theirs, their_total = hf_losses(outputs, targets, eos, costs, weights)
    assert set(theirs) | {"class_error"} == set(ours)
    assert len(theirs) == 4 * L
    for k, v in theirs.items():
        assert float(ours[k]) == pytest.approx(float(v), abs=1e-5), k
    assert float(criterion.total(ours)) == pytest.approx(float(their_total), abs=1e-5)


def test_total_weights_and_gradient():
    g = torch.Generator().manual_seed(7)
    outputs, targets = random_outputs(g, 2), random_targets(g, [2, 3])
    for layer in [outputs, *outputs["aux_outputs"]]:
        for k in ("pred_logits", "pred_boxes"):
            layer[k].requires_grad_(True)
    criterion = SetCriterion(C)
    losses = criterion(outputs, targets)
    expected = sum(w * (losses[k] + sum(losses[f"{k}_{i}"] for i in range(L - 1)))
                   for k, w in {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}.items())
    total = criterion.total(losses)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert not losses["class_error"].requires_grad and not losses["cardinality_error"].requires_grad
    total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0
               for layer in [outputs, *outputs["aux_outputs"]] for t in (layer["pred_logits"], layer["pred_boxes"]))


def test_invariant_to_target_order():
    g = torch.Generator().manual_seed(8)
    outputs, targets = random_outputs(g, 2), random_targets(g, [5, 3])
    criterion = SetCriterion(C)
    base = criterion(outputs, targets)
    perm = torch.randperm(5, generator=g)
    shuffled = [{"labels": targets[0]["labels"][perm], "boxes": targets[0]["boxes"][perm]}, targets[1]]
    permuted = criterion(outputs, shuffled)
    for k in base:
        assert float(permuted[k]) == pytest.approx(float(base[k]), abs=1e-6), k


def test_zero_target_images():
    g = torch.Generator().manual_seed(9)
    outputs, targets = random_outputs(g, 2), random_targets(g, [0, 0])
    losses = SetCriterion(C, eos_coef=0.1)(outputs, targets)
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_giou"]) == 0
    # every slot is "no object": the weighted mean of CE equals the plain mean
    expected = torch.nn.functional.cross_entropy(outputs["pred_logits"].reshape(-1, C + 1),
                                                 torch.full((2 * Q,), C))
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), abs=1e-6)
    assert torch.isfinite(SetCriterion(C).total(losses))


def test_bf16_outputs_give_float32_losses():
    g = torch.Generator().manual_seed(10)
    outputs, targets = random_outputs(g, 2), random_targets(g, [2, 1])
    bf = {"pred_logits": outputs["pred_logits"].bfloat16(), "pred_boxes": outputs["pred_boxes"].bfloat16()}
    losses = SetCriterion(C)(bf, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_from_config():
    cfg = TrainConfig(set_cost_class=2, set_cost_bbox=3, set_cost_giou=4, ce_loss_coef=0.5,
                      bbox_loss_coef=6, giou_loss_coef=7, eos_coef=0.3)
    crit = SetCriterion.from_config(cfg, num_classes=4)
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (2, 3, 4)
    assert crit.weight_dict == {"loss_ce": 0.5, "loss_bbox": 6, "loss_giou": 7}
    assert crit.class_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.3])
    assert crit.weight("loss_giou_3") == 7 and crit.weight("class_error") == 0
    with pytest.raises(ValueError, match="unknown loss"):
        SetCriterion(4, weight_dict={"loss_mask": 1})


def _distributed_worker(rank, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(11)
        outputs, targets = random_outputs(g, 1), random_targets(g, [4])
        if rank == 1:
            targets = random_targets(g, [2])
        losses = SetCriterion(C)(outputs, targets)
        # num_boxes is (4 + 2) / 2 = 3 on both processes; rank 0 alone would divide by 4
        alone = SetCriterion(C)
        dist.destroy_process_group()
        local = alone(outputs, targets)
        if rank == 0:
            torch.save({"dist": losses["loss_bbox"], "local": local["loss_bbox"]}, result_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_num_boxes_is_averaged_across_processes():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_distributed_worker, args=(os.path.join(tmp, "init"), result), nprocs=2)
        r = torch.load(result)
    assert float(r["dist"]) == pytest.approx(float(r["local"]) * 4 / 3, rel=1e-6)
