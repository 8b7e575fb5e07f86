"""Figures: box drawing, the query-slot figure's data, attention maps, training curves."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from detrkit.config import ModelConfig
from detrkit.detector import Detector
from detrkit.model import build_model
from detrkit.viz import (SlotPredictions, box_kinds, choose_slots, collect_slot_predictions, compute_attention,
                         decoder_attention, draw_detections, encoder_attention, metric_series, plot_attention,
                         plot_query_slots, plot_slot_usage, plot_training_curves, query_figure_data,
                         read_metrics, save_query_figures, slot_usage, text_colour, valid_feature_sizes)
from detrkit.viz.attention import parse_points
from detrkit.viz.draw import class_colour, line_width_for
from detrkit.viz.queries import KIND_COLOURS

CLASSES = ["cat", "dog", "bird"]


def tiny_config(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                dropout=0.0, num_queries=6, image_size=64, max_image_size=96, class_names=CLASSES,
                category_ids=[3, 7, 11])
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------- draw
def test_text_colour_contrasts_with_its_tag():
    assert text_colour((255, 255, 0)) == (0, 0, 0)  # yellow tag: black text
    assert text_colour((0, 0, 128)) == (255, 255, 255)  # navy tag: white text
    for label in range(20):  # every palette colour gets the more contrasting text colour
        bg = class_colour(label)
        tc = text_colour(bg)
        other = (255, 255, 255) if tc == (0, 0, 0) else (0, 0, 0)

        def lum(c):
            lin = [(v / 255 / 12.92) if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
            return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

        def ratio(a, b):
            la, lb = sorted((lum(a), lum(b)), reverse=True)
            return (la + 0.05) / (lb + 0.05)

        assert ratio(bg, tc) >= ratio(bg, other)


def test_draw_detections_keeps_size_and_draws_class_coloured_boxes():
    image = Image.new("L", (200, 120), 128)  # grayscale input: output is RGB of the same size
    out = draw_detections(image, [[20, 40, 120, 100], [0, 0, 50, 30]], [1, 2], [0.91, 0.55], CLASSES)
    assert out.size == (200, 120) and out.mode == "RGB"
    assert image.mode == "L"  # the input is not modified
    a = np.asarray(out)
    # bottom edge of box 0 (no label there) is drawn in class 1's colour
    assert tuple(a[100, 70]) == class_colour(1)
    assert tuple(a[70, 20]) == class_colour(1)  # left edge
    # far from any box the image is untouched
    assert tuple(a[115, 190]) == (128, 128, 128)
    # the label tag of box 0 sits above its top edge, filled with the class colour
    tag = a[25:40, 20:60].reshape(-1, 3)
    assert (tag == class_colour(1)).all(1).mean() > 0.3
    assert line_width_for((4000, 3000)) > line_width_for((400, 300)) >= 2


def test_draw_detections_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_detections(Image.new("RGB", (10, 10)), [[0, 0, 5, 5], [1, 1, 4, 4]], [0])


# ------------------------------------------------------------------------------------- query slots
class TableModel(nn.Module):
    """A stand-in DETR whose outputs are read from tables, one row per image in the order seen."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor):
        super().__init__()
        self.logits, self.boxes, self.seen = logits, boxes, 0

    def forward(self, images, mask=None, return_attention=False, batch_invariant=False):
        b = len(images)
        rows = slice(self.seen, self.seen + b)
        self.seen += b
        return {"pred_logits": self.logits[rows], "pred_boxes": self.boxes[rows]}


def _table(num_images=5, q=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(num_images, q, 4, generator=g) * 0.5 + 0.05
    logits = torch.full((num_images, q, c + 1), -4.0)
    logits[..., -1] = 4.0  # "no object" everywhere by default
    # slot 3 fires on every image (class 2), slot 1 on images 0-2 (class 0 twice, class 1 once)
    logits[:, 3, 2] = 8.0
    logits[0, 1, 0] = logits[1, 1, 0] = logits[2, 1, 1] = 8.0
    return logits, boxes


def test_collect_slot_predictions_records_every_slot_on_every_image():
    logits, boxes = _table()
    # image i is 40 px wide and 20*(i+1) px high: mixed sizes and aspect ratios, padded in batches of 2
    images = [Image.new("RGB", (40, 20 * (i + 1)), (i * 40, 0, 0)) for i in range(5)]
    det = Detector(TableModel(logits, boxes), tiny_config())
    preds = collect_slot_predictions(det, images, batch_size=2, progress=False)
    assert preds.boxes.shape == (5, 6, 4)
    np.testing.assert_allclose(preds.boxes, boxes.numpy(), atol=1e-6)
    np.testing.assert_array_equal(preds.image_sizes, [[20 * (i + 1), 40] for i in range(5)])
    prob = logits.softmax(-1)[..., :-1]
    np.testing.assert_allclose(preds.scores, prob.max(-1).values.numpy(), atol=1e-6)
    assert preds.labels[0, 3] == 2 and preds.labels[2, 1] == 1
    assert preds.class_names == CLASSES


def _known_predictions() -> SlotPredictions:
    # 3 images: 100x50 (w x h), 50x100, 80x80. Slot 0 boxes chosen to hit each colour rule.
    sizes = np.array([[50, 100], [100, 50], [80, 80]])
    boxes = np.zeros((3, 4, 4))
    boxes[:, :, :] = [0.5, 0.5, 0.2, 0.2]  # small (0.04 < 0.1) by default
    boxes[0, 0] = [0.3, 0.7, 0.4, 0.6]  # 40x30 px on a 100x50 image: large, horizontal (w >= h in pixels)
    boxes[1, 0] = [0.6, 0.2, 0.8, 0.5]  # 40x50 px on a 50x100 image: large, vertical
    boxes[2, 0] = [0.1, 0.9, 0.3, 0.3]  # 0.09 of the image: small
    scores = np.array([[0.9, 0.2, 0.7, 0.1], [0.8, 0.6, 0.1, 0.1], [0.2, 0.9, 0.95, 0.1]])
    labels = np.array([[0, 1, 2, 0], [0, 1, 2, 0], [1, 1, 2, 0]])
    return SlotPredictions(boxes, scores, labels, sizes, ["a.jpg", "b.jpg", "c.jpg"], CLASSES)


def test_box_kinds_follow_the_stated_rule():
    p = _known_predictions()
    kinds = box_kinds(p.boxes, p.image_sizes, small_area=0.1)
    assert kinds[:, 0].tolist() == [1, 2, 0]
    assert (kinds[:, 1:] == 0).all()
    # a larger small-area threshold turns the horizontal box (0.24 of the image) small
    assert box_kinds(p.boxes, p.image_sizes, small_area=0.25)[0, 0] == 0


def test_query_figure_data_and_colours_equal_the_expected():
    p = _known_predictions()
    data = query_figure_data(p, [0, 2], small_area=0.1)
    panel = data["panels"][0]
    assert panel["slot"] == 0
    np.testing.assert_allclose(panel["centres"], [[0.3, 0.7], [0.6, 0.2], [0.1, 0.9]])
    assert panel["kinds"] == ["horizontal", "vertical", "small"]
    assert data["panels"][1]["kinds"] == ["small"] * 3
    # the figure draws exactly those points in those colours
    fig = plot_query_slots(p, [0], small_area=0.1)
    ax = fig.axes[0]
    drawn = {}
    for coll in ax.collections:
        colour = tuple(np.round(coll.get_facecolor()[0][:3], 3))
        for xy in coll.get_offsets():
            drawn[tuple(np.round(xy, 6))] = colour
    expect = {(0.3, 0.7): "horizontal", (0.6, 0.2): "vertical", (0.1, 0.9): "small"}
    assert set(drawn) == set(expect)
    for xy, kind in expect.items():
        assert drawn[xy] == tuple(np.round(to_rgba(KIND_COLOURS[kind])[:3], 3))
    assert ax.get_ylim() == (1.0, 0.0)  # y down, as in an image
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "0.1" in legend and "w ≥ h" in legend
    # min_score keeps only confident boxes
    assert query_figure_data(p, [0], min_score=0.5)["panels"][0]["image_index"] == [0, 1]


def test_choose_slots_by_usage_and_by_index():
    p = _known_predictions()
    # fires above 0.5: slots 0, 1, 2 on 2 images each, slot 3 never; ties by mean score (0.63, 0.57, 0.58)
    assert choose_slots(p, n=3, threshold=0.5) == [0, 2, 1]
    assert choose_slots(p, n=1, threshold=0.85) == [0]  # slot 0: 0.9; slot 1: 0.9; slot 2: 0.95 -> all once
    assert choose_slots(p, n=2, threshold=0.75)[0] == 0  # slot 0 fires twice (0.9, 0.8)
    assert choose_slots(p, slot_ids=[3, 1]) == [3, 1]
    with pytest.raises(ValueError, match=r"\[4\] out of range"):
        choose_slots(p, slot_ids=[4])


def test_choose_slots_threshold_ranking():
    p = _known_predictions()
    # at 0.85 each of slots 0, 1, 2 fires once; mean scores 0.633, 0.567, 0.583 decide
    assert choose_slots(p, n=3, threshold=0.85) == [0, 2, 1]


def test_slot_usage_counts_per_class():
    p = _known_predictions()
    u = slot_usage(p, threshold=0.5)
    assert u["fires"] == [2, 2, 2, 0]
    assert u["per_class"][0] == [2, 0, 0]
    assert u["per_class"][1] == [0, 2, 0]
    assert u["per_class"][2] == [0, 0, 2]
    assert u["fraction"][0] == pytest.approx(2 / 3)
    fig = plot_slot_usage(p, threshold=0.5)
    heights = sorted(round(r.get_height()) for r in fig.axes[0].patches if r.get_height() > 0)
    assert heights == [2, 2, 2]


def test_save_query_figures_writes_figure_and_numbers(tmp_path):
    p = _known_predictions()
    paths = save_query_figures(p, tmp_path / "q.png", n=2, threshold=0.5)
    assert Image.open(paths["figure"]).size[0] > 100
    data = json.loads(paths["data"].read_text())
    assert [pl["slot"] for pl in data["panels"]] == [0, 2]
    assert json.loads(paths["usage_data"].read_text())["fires"] == [2, 2, 2, 0]
    assert paths["usage_figure"].is_file()


# ---------------------------------------------------------------------------------------- attention
def _hand_weights(attn: nn.Module, query, key, key_padding_mask):
    """Attention weights [B,heads,Lq,Lk] from the layer's packed in_proj weights, computed by hand."""
    d, heads = attn.dim, attn.nheads
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    q = query @ wq.T + bq
    k = key @ wk.T + bk
    dh = d // heads
    q = q.view(q.shape[0], q.shape[1], heads, dh).permute(0, 2, 1, 3)
    k = k.view(k.shape[0], k.shape[1], heads, dh).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1), (wv, bv)


def _capture(module):
    store = {}

    def hook(mod, args, kwargs, output):
        store["args"], store["output"] = args, output

    handle = module.register_forward_hook(hook, with_kwargs=True)
    return store, handle


def test_attention_maps_are_probabilities_over_valid_cells_with_padding(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 40, 50)]  # second image is padded
    with torch.no_grad():
        out = tiny_model(images, return_attention=True)
    att = out["attention"]
    fmask = att["feature_mask"]
    assert fmask[1].any() and not fmask[0].any()
    (h0, w0), (h1, w1) = valid_feature_sizes(fmask)
    assert (h0, w0) == (2, 3) and (h1, w1) == (2, 2)
    dec = decoder_attention(att)  # [B,Q,h,w]
    assert dec.shape == (2, 6, 2, 3)
    valid = ~fmask
    sums = (dec * valid[:, None]).sum((-1, -2))
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (dec[1][:, ~valid[1]] == 0).all()  # exactly zero on padding
    pts = [[[0, 0], [2, 1]], [[1, 1], [0, 1]]]
    enc = encoder_attention(att, pts)
    assert enc.shape == (2, 2, 2, 3)
    esums = (enc * valid[:, None]).sum((-1, -2))
    torch.testing.assert_close(esums, torch.ones_like(esums))
    assert (enc[1][:, ~valid[1]] == 0).all()
    with pytest.raises(ValueError, match="feature grid"):
        encoder_attention(att, [[[3, 0]], [[0, 0]]])


def test_decoder_map_is_what_the_model_used(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 40, 50)]
    layer = tiny_model.transformer.decoder.layers[-1].multihead_attn
    store, handle = _capture(layer)
    try:
        with torch.no_grad():
            plain = tiny_model(images)  # the ordinary (fused-kernel) forward
            used_output = store["output"][0]
            att = tiny_model(images, return_attention=True)["attention"]
            query, key, value, mask = store["args"][:4]
    finally:
        handle.remove()
    weights, (wv, bv) = _hand_weights(layer, query, key, mask)  # [B,heads,Q,N]
    b, heads, q, n = weights.shape
    ours = decoder_attention(att).reshape(b, q, n)
    torch.testing.assert_close(ours, weights.mean(1), atol=1e-6, rtol=1e-5)
    # these weights reproduce the layer's output in the ordinary forward: they are what it used
    v = (value @ wv.T + bv).view(b, n, heads, -1).permute(0, 2, 1, 3)
    mixed = (weights @ v).permute(0, 2, 1, 3).reshape(b, q, -1)
    torch.testing.assert_close(layer.out_proj(mixed), used_output, atol=1e-5, rtol=1e-4)
    assert plain["pred_boxes"].shape == (2, 6, 4)


def test_encoder_map_matches_hand_computation(tiny_model):
    images = [torch.randn(3, 64, 96)]
    layer = tiny_model.transformer.encoder.layers[-1].self_attn
    store, handle = _capture(layer)
    try:
        with torch.no_grad():
            att = tiny_model(images, return_attention=True)["attention"]
    finally:
        handle.remove()
    query, key, _, mask = store["args"][:4]
    weights, _ = _hand_weights(layer, query, key, mask)  # [1,heads,N,N]
    enc = encoder_attention(att, [[[2, 1]]])  # col 2, row 1 -> token 1*3 + 2 = 5
    torch.testing.assert_close(enc.reshape(-1), weights.mean(1)[0, 5], atol=1e-6, rtol=1e-5)


def test_compute_attention_on_one_image_and_plot(tiny_model):
    det = Detector(tiny_model, tiny_config())
    image = Image.fromarray((np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8))
    result = compute_attention(det, image, threshold=0.0, max_detections=3)
    assert len(result.slots) == 3
    rows, cols = result.grid
    assert result.decoder_maps.shape == (3, rows, cols)
    np.testing.assert_allclose(result.decoder_maps.sum((-1, -2)), 1.0, atol=1e-5)
    assert result.encoder_weights.shape == (rows * cols, rows * cols)
    np.testing.assert_allclose(result.encoder_weights.sum(1), 1.0, atol=1e-5)
    # the cells cover the whole image
    assert rows * result.cell_size[0] >= 70 and cols * result.cell_size[1] >= 110
    # boxes agree with the detector's own post-processing, in pixels of the original
    [ref] = det.predict(image, threshold=0.0, top_k=3)
    np.testing.assert_allclose(result.boxes, ref.boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(result.scores, ref.scores.numpy(), atol=1e-6)
    fig = plot_attention(result, parse_points("10,10; 100,60"))
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum("slot" in t for t in titles) == 3 and sum(t.startswith("point") for t in titles) == 2
    # no detections: still a figure (encoder part on default points)
    empty = compute_attention(det, image, threshold=1.0)
    assert len(empty.slots) == 0
    assert isinstance(plot_attention(empty), Figure)


def test_parse_points_errors():
    assert parse_points("1,2;3.5,4") == [(1.0, 2.0), (3.5, 4.0)]
    with pytest.raises(ValueError, match="bad point"):
        parse_points("1,2;3")


# ------------------------------------------------------------------------------------------- curves
def test_curves_read_liberally_and_plot(tmp_path, caplog):
    lines = [
        json.dumps({"step": 10, "epoch": 0, "loss": 3.0, "loss_ce": 1.5, "loss_bbox": 0.2, "loss_giou": 0.5,
                    "lr": 1e-4}),
        "not json {",
        json.dumps({"step": 20, "epoch": 0, "train/loss": 2.0, "train/loss_ce": 1.0}),
        json.dumps({"epoch": 1, "eval": {"AP": 0.05, "AP50": 0.12}}),
        json.dumps({"type": "eval", "epoch": 2, "AP": 0.08, "AP50": 0.2}),
        json.dumps({"epoch": 0, "split": "val", "AP": 0.01, "AP50": 0.04, "loss": 2.5}),
        "",
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    records = read_metrics(tmp_path)
    assert len(records) == 5
    assert "metrics.jsonl:2" in caplog.text
    s = metric_series(records)
    assert s["loss"]["axis"] == "step" and s["loss"]["x"].tolist() == [10, 20]
    assert s["loss"]["y"].tolist() == [3.0, 2.0]
    assert s["loss_ce"]["y"].tolist() == [1.5, 1.0]
    assert s["eval/AP"]["axis"] == "epoch" and s["eval/AP"]["x"].tolist() == [0, 1, 2]
    assert s["eval/AP"]["y"].tolist() == [0.01, 0.05, 0.08]
    assert s["eval/loss"]["y"].tolist() == [2.5]
    assert "lr" not in s
    fig = plot_training_curves(tmp_path)
    loss_ax, ap_ax = fig.axes
    assert {l.get_label() for l in loss_ax.get_lines()} >= {"loss", "loss_ce", "loss_bbox", "loss_giou", "eval/loss"}
    assert {l.get_label() for l in ap_ax.get_lines()} == {"AP", "AP50"}


def test_curves_without_values_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no loss or AP"):
        plot_training_curves(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nowhere")


def test_labels_do_not_cover_each_other():
    from detrkit.viz.draw import _font, _overlaps, _place_tag
    from PIL import ImageDraw

    image = Image.new("RGB", (300, 200), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    font = _font(14)
    placed = []
    # three boxes sharing their top-left corner: each label must find its own spot
    for box in ([50, 60, 200, 150], [52, 62, 190, 140], [54, 64, 180, 130]):
        rect = _place_tag(draw, "triangle 0.99", tuple(box), font, 2, image.size, placed)
        assert not any(_overlaps(rect, p) for p in placed)
        assert 0 <= rect[0] and rect[2] <= 300 and 0 <= rect[1] and rect[3] <= 200
        placed.append(rect)


def test_viz_commands_end_to_end(tmp_path, tiny_model, capsys):
    from detrkit.cli import main

    weights = Detector(tiny_model, tiny_config()).save_pretrained(tmp_path / "w")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 48), (50, 80), (70, 70)]):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
                       for i, (w, h) in enumerate([(64, 48), (50, 80), (70, 70)])],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 3, "bbox": [1, 1, 10, 10], "area": 100,
                             "iscrowd": 0}],
            "categories": [{"id": c, "name": n} for c, n in zip([3, 7, 11], CLASSES)]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    out = tmp_path / "figs"
    assert main(["viz", "queries", "--weights", str(weights), "--data", str(tmp_path / "val.json"),
                 "--images", str(tmp_path / "imgs"), "--out", str(out / "q.png"), "--slot-ids", "0,5",
                 "--threshold", "0.0"]) == 0
    data = json.loads((out / "q.json").read_text())
    assert [p["slot"] for p in data["panels"]] == [0, 5] and data["num_images"] == 3
    assert len(data["panels"][0]["centres"]) == 3  # one box per slot per image
    assert json.loads((out / "q_usage.json").read_text())["fires"] == [3] * 6
    assert main(["viz", "attention", str(tmp_path / "imgs" / "1.png"), "--weights", str(weights),
                 "--out", str(out / "a.png"), "--threshold", "0.0", "--points", "5,5;40,70"]) == 0
    assert Image.open(out / "a.png").size[0] > 200
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"type": "train", "step": s, "loss": 5.0 / s}) for s in range(1, 6)))
    assert main(["viz", "curves", str(tmp_path / "run"), "--out", str(out / "c.png")]) == 0
    assert (out / "c.png").is_file()
