"""Small objects on the CPU presets: detr-tiny-s16's stride-16 (DC5) features, through the feature
cache's packed path, and input sizes that keep a 10 px object near a whole feature cell."""
import torch

from detrkit.config import get_preset
from detrkit.engine.diagnose import small_object_share
from detrkit.engine.feature_cache import _extractor
from detrkit.model.backbone import Backbone


def test_stride_16_features_through_the_cache_extractor():
    torch.manual_seed(0)
    cfg = get_preset("detr-tiny-s16").model
    assert cfg.dilation and cfg.queries_at == "attention"
    backbone = Backbone(cfg.backbone, cfg.dilation).eval()
    x, mask = torch.randn(2, 3, 160, 224), torch.zeros(2, 160, 224, dtype=torch.bool)
    mask[1, 128:, :] = True  # the second image is padded at the bottom
    with torch.no_grad():
        ref, ref_mask = backbone(x, mask)
        got, got_mask = _extractor(backbone, torch.device("cpu"), amp=True)(x, mask)
    assert ref.shape == got.shape == (2, 512, 10, 14)  # stride 16
    assert torch.equal(ref_mask, got_mask) and got_mask[1, 8:].all() and not got_mask[1, :8].any()
    assert ((got.float() - ref).abs().max() / ref.abs().max()) < 0.03  # bf16 rounding


def test_presets_against_ten_pixel_objects():
    """Hard-variant sizes: 224-320 px images with 10-120 px objects. detr-tiny's stride-32 map at 144 px
    loses the small ones; detr-tiny-s16 keeps every object of 16 px and more above one cell."""
    boxes = torch.tensor([[10.0, 10.0], [16.0, 16.0], [30.0, 30.0], [120.0, 60.0]])
    images = torch.tensor([[256.0, 256.0]] * 4)
    assert small_object_share(boxes, images, get_preset("detr-tiny").model) == 0.75
    assert small_object_share(boxes, images, get_preset("detr-tiny-s16").model) == 0.25
