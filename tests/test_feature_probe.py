"""The linear probe of cached backbone features (engine/feature_probe.py) and its place in the diagnosis."""
from __future__ import annotations

import itertools
import logging

import torch

from detrkit.config import ModelConfig
from detrkit.engine.diagnose import diagnose
from detrkit.engine.feature_probe import _auc, centre_cells, check_cached_features, probe_features


def _items(n_images: int, informative: bool, classes: int = 4, seed: int = 0) -> list:
    """Cached-feature items [16,6,8] with 1-3 objects each; when informative, a centre cell's features
    hold a one-hot of its class (plus noise), else the features are noise alone."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n_images):
        n = int(torch.randint(1, 4, (), generator=g))
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.9 + 0.05, torch.full((n, 2), 0.1)], 1)
        labels = torch.randint(0, classes, (n,), generator=g)
        f = torch.randn(16, 6, 8, generator=g)
        if informative:
            cells = centre_cells((6, 8), {"boxes": boxes, "labels": labels}).view(6, 8)
            for y, x in (cells > 0).nonzero().tolist():
                f[int(cells[y, x]) - 1, y, x] += 4.0
        items.append((f.to(torch.bfloat16), {"boxes": boxes, "labels": labels}))
    return items


def test_centre_cells_put_each_class_at_its_centre():
    target = {"boxes": torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.99, 0.6, 0.02, 0.3]]), "labels": torch.tensor([2, 0])}
    cells = centre_cells((4, 5), target).view(4, 5)
    assert cells[0, 0] == 3 and cells[2, 4] == 1 and int((cells > 0).sum()) == 2


def test_auc_is_the_pairwise_ranking_with_ties_halved():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    positive = torch.rand(40, generator=g) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in
             itertools.product(scores[positive].tolist(), scores[~positive].tolist())]
    assert abs(_auc(scores, positive) - sum(pairs) / len(pairs)) < 1e-9


def test_the_probe_tells_informative_features_from_noise():
    good = probe_features(_items(120, True), 4)
    bad = probe_features(_items(120, False), 4)
    assert good.objectness_auc > 0.95 and good.class_accuracy > 0.9 and not good.weak
    assert 0.35 < bad.objectness_auc < 0.65 and bad.class_gain < 0.15 and bad.weak
    assert good.images == 120 and good.cells > 120
    assert probe_features(_items(4, True), 4) is None  # too few objects to say anything


def test_the_probe_leaves_the_runs_random_stream_alone():
    # a diagnostic between the feature cache and DETR's steps: reseeding there would change the run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe_features(_items(30, True), 4, steps=5)
    assert torch.equal(torch.rand(3), expected)


def test_a_weak_probe_is_logged_and_named_as_a_cause(caplog):
    class Cache:
        items = [_items(120, False)]

    with caplog.at_level(logging.INFO):
        probe = check_cached_features(Cache(), 4)
    assert probe["weak"] and "feature check" in caplog.text and "pretrain_dense_steps" in caplog.text
    cfg = ModelConfig(backbone="resnet18", image_size=128, max_image_size=128)
    d = diagnose({"AP50": 0.01}, 5000, "pretrained-crops", cfg, feature_probe=probe)
    assert any("do not name the objects" in c for c in d.causes)
    fine = diagnose({"AP50": 0.01}, 5000, "pretrained-crops", cfg, feature_probe={**probe, "weak": False})
    assert not any("do not name the objects" in c for c in fine.causes)
