"""ONNX export: dynamic batch/height/width, padding mask as input, parity with PyTorch float32."""
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from detrkit.config import ModelConfig  # noqa: E402
from detrkit.export.onnx import OnnxDETR, export_onnx  # noqa: E402
from detrkit.model import build_model, pad_images  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                      dim_feedforward=64, num_queries=8, class_names=["a", "b", "c"])
    model = build_model(cfg).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "detr.onnx", sample_size=(96, 128))
    return model, OnnxDETR(path)


def _check(model, session, images):
    batch, mask = pad_images(images)
    with torch.no_grad():
        ref = model(batch, mask)
    got = session(batch, mask)
    assert got["pred_logits"].shape == ref["pred_logits"].shape
    for key in ("pred_logits", "pred_boxes"):
        assert (got[key] - ref[key]).abs().max().item() <= 1e-4, key
    return ref, got


def test_onnx_matches_pytorch_batch_1(exported):
    model, session = exported
    _check(model, session, [torch.randn(3, 200, 264)])


def test_onnx_matches_pytorch_batch_3_mixed_sizes(exported):
    model, session = exported
    gen = torch.Generator().manual_seed(3)
    # sizes other than the tracing example, odd ones included, so padding differs per image
    images = [torch.randn(3, h, w, generator=gen) for h, w in ((201, 263), (150, 300), (97, 131))]
    ref, got = _check(model, session, images)
    # a padded image's result differs from its unpadded one, and ONNX follows that too
    alone = session([images[2]])
    assert (alone["pred_boxes"][0] - got["pred_boxes"][2]).abs().max() > 1e-6


def test_onnx_accepts_a_list_and_rejects_a_missing_file(exported, tmp_path):
    model, session = exported
    with torch.no_grad():
        ref = model([torch.ones(3, 64, 64)])
    got = session([torch.ones(3, 64, 64)])
    torch.testing.assert_close(got["pred_boxes"], ref["pred_boxes"], atol=1e-4, rtol=0)
    with pytest.raises(FileNotFoundError, match="no.onnx"):
        OnnxDETR(tmp_path / "no.onnx")


def test_export_command_writes_a_verified_file(exported, tmp_path):
    from detrkit.cli import main
    from detrkit.weights.native import save_native

    model, _ = exported
    weights = save_native(model.state_dict(), model.cfg, tmp_path / "weights")
    out = tmp_path / "cli.onnx"
    assert main(["export", "onnx", "--weights", str(weights), "--out", str(out), "--verify"]) == 0
    assert out.stat().st_size > 0
    assert main(["export", "onnx", "--weights", str(tmp_path / "missing"), "--out", str(out)]) == 1  # one line
    with pytest.raises(FileNotFoundError):
        main(["--debug", "export", "onnx", "--weights", str(tmp_path / "missing"), "--out", str(out)])
