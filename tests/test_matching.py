import itertools

import pytest
import torch

from detrkit.matching import HungarianMatcher


def random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    """n valid cxcywh boxes inside the unit square."""
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    return torch.cat([c, wh], 1)


def random_case(g, sizes, Q, C, dtype=torch.float32):
    outputs = {"pred_logits": torch.randn(len(sizes), Q, C + 1, generator=g).to(dtype),
               "pred_boxes": torch.stack([random_boxes(g, Q) for _ in sizes]).to(dtype)}
    targets = [{"labels": torch.randint(0, C, (n,), generator=g), "boxes": random_boxes(g, n)} for n in sizes]
    return outputs, targets


def naive_cost(logit, pred_box, label, tgt_box, wc=1.0, wb=5.0, wg=2.0) -> float:
    """One pair's matching cost in float64, written out from the paper's definition."""
    prob = torch.softmax(logit.double(), -1)[label].item()
    p, t = pred_box.double().tolist(), tgt_box.double().tolist()
    l1 = sum(abs(a - b) for a, b in zip(p, t))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(p), corners(t)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return -wc * prob + wb * l1 - wg * giou


def brute_force_optimum(cost: list[list[float]]) -> float:
    Q, N = len(cost), len(cost[0])
    if N <= Q:
        return min(sum(cost[p][j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(Q), N))
    return min(sum(cost[i][t] for i, t in enumerate(perm)) for perm in itertools.permutations(range(N), Q))


def test_matching_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    for trial in range(25):
        Q = int(torch.randint(1, 7, (1,), generator=g))
        sizes = torch.randint(1, 6, (2,), generator=g).tolist()
        outputs, targets = random_case(g, sizes, Q, C=3)
        indices = matcher(outputs, targets)
        for b, (pi, ti) in enumerate(indices):
            cost = [[naive_cost(outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q],
                                targets[b]["labels"][j], targets[b]["boxes"][j]) for j in range(sizes[b])]
                    for q in range(Q)]
            assert pi.dtype == ti.dtype == torch.int64
            assert len(pi) == len(ti) == min(Q, sizes[b])
            assert len(set(pi.tolist())) == len(pi) and len(set(ti.tolist())) == len(ti)
            got = sum(cost[p][t] for p, t in zip(pi.tolist(), ti.tolist()))
            assert got == pytest.approx(brute_force_optimum(cost), abs=1e-5), (trial, b)


def test_zero_target_images_get_empty_indices():
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    outputs, targets = random_case(g, [0, 3, 0], Q=5, C=4)
    indices = matcher(outputs, targets)
    assert [len(p) for p, _ in indices] == [0, 3, 0]
    assert all(p.dtype == t.dtype == torch.int64 for p, t in indices)
    outputs, targets = random_case(g, [0, 0], Q=5, C=4)
    assert [(len(p), len(t)) for p, t in matcher(outputs, targets)] == [(0, 0), (0, 0)]


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=3.0, cost_giou=1.0)
    outputs, targets = random_case(g, [4, 1, 0, 6, 2], Q=8, C=5)
    batched = matcher(outputs, targets)
    for b, t in enumerate(targets):
        single = matcher({k: v[b: b + 1] for k, v in outputs.items()}, [t])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_bf16_outputs_are_matched_in_float32():
    g = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher()
    outputs, targets = random_case(g, [3, 2], Q=6, C=3, dtype=torch.bfloat16)
    cost = matcher.cost_matrix(outputs, targets)
    assert cost.dtype == torch.float32
    as_f32 = matcher.cost_matrix({k: v.float() for k, v in outputs.items()}, targets)
    assert torch.equal(cost, as_f32)


def test_bad_targets_raise():
    g = torch.Generator().manual_seed(4)
    matcher = HungarianMatcher()
    outputs, targets = random_case(g, [2], Q=4, C=3)
    targets[0]["labels"] = torch.tensor([0, 3])  # 3 is the no-object index
    with pytest.raises(ValueError, match="labels"):
        matcher(outputs, targets)
    with pytest.raises(ValueError, match="2 images"):
        matcher({k: v.repeat(2, 1, 1) for k, v in outputs.items()}, targets)
    with pytest.raises(ValueError, match="all three costs"):
        HungarianMatcher(0, 0, 0)
