"""`Detector`: a DETR model with its config, ready to load weights and detect objects."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .config import ModelConfig
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_shape
from .model import DETR, build_model
from .postprocess import Detections, postprocess
from .weights import authors, huggingface, hub, native

def _as_float_image(image: Any) -> Tensor:
    """path | PIL | numpy HWC/HW | tensor CHW/HW (uint8 or float in [0,1]) -> float [3,H,W] in [0,1]."""
    if isinstance(image, (str, Path)):
        from .data.images import load_image  # upright (EXIF), RGB, robust to odd modes

        image = load_image(image)
    if isinstance(image, Image.Image):
        return TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    elif isinstance(image, Tensor):
        t = image[None] if image.dim() == 2 else image
    else:
        raise TypeError(f"cannot use an image of type {type(image).__name__}")
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [3,H,W] / [H,W,3] / [H,W], got shape {tuple(t.shape)}")
    t = t[:3] if t.shape[0] != 1 else t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        return t.float() / 255
    if not t.is_floating_point():
        raise ValueError(f"integer images must be uint8, got {t.dtype}")
    return t.float()


class Detector:
    """Load weights, detect objects.

    >>> det = Detector.from_pretrained("detr-r50")
    >>> [result] = det.predict("street.jpg", threshold=0.7)
    >>> result.boxes, result.scores, result.label_names
    """

    def __init__(self, model: DETR, config: ModelConfig | None = None, device: str | torch.device = "cpu",
                 precision: str = "float32"):
        """precision: "float32" (the reference numbers), "bf16" (autocast; same top detections,
        several times faster on CPUs with AMX and on GPUs) or "auto" (bf16 where it is fast)."""
        if precision not in ("float32", "bf16", "auto"):
            raise ValueError(f"precision must be 'float32', 'bf16' or 'auto', got {precision!r}")
        self.model = model.eval().to(device)
        self.config = config or model.cfg
        self.device = torch.device(device)
        self.precision = precision
        # the panoptic model (mask head) whose `detr` is `self.model`, when the weights have one
        self.segmentation: torch.nn.Module | None = None
        self._runner: torch.nn.Module | None = None
        self._runner_key: tuple | None = None

    def _inference_model(self) -> torch.nn.Module:
        """An optimised copy of `self.model` (batch norm folded into convolutions, packed oneDNN
        kernels on CPU, bf16 weights when asked), rebuilt whenever the weights or device change.
        Any other module (a stand-in in tests, a wrapper of the user's) runs as it is."""
        if type(self.model) is not DETR:
            return self.model
        key = (self.precision, self.device, tuple(p._version for p in self.model.parameters()),
               tuple(id(p) for p in self.model.parameters()))
        if self._runner is None or key != self._runner_key:
            from .model.fuse import optimize_for_inference

            dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}[self.precision]
            self._runner, self._runner_key = optimize_for_inference(self.model.eval(), dtype), key
        return self._runner

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, **kwargs) -> "Detector":
        return cls(build_model(config), config, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu", *,
                        dilation: bool | None = None, precision: str = "float32") -> "Detector":
        """A native dir/.safetensors, an authors' .pth, a Hugging Face dir, or a published name.
        Panoptic weights (with a mask head) also give `predict(..., task="panoptic")`."""
        from .weights.panoptic import load_panoptic_weights, is_panoptic

        sd, cfg = load_panoptic_weights(source, dilation=dilation)
        if is_panoptic(sd):
            from .model.segmentation import DETRSegmentation

            seg = DETRSegmentation(cfg)
            missing, unexpected = seg.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"{source}: weights do not fit the panoptic model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            det = cls(seg.detr, cfg, device=device, precision=precision)
            det.segmentation = seg.eval().to(device)
            return det
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not fit the model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        return cls(model, cfg, device=device, precision=precision)

    def save_pretrained(self, path: str | Path) -> Path:
        model = self.segmentation if self.segmentation is not None else self.model
        return native.save_native(model.state_dict(), self.config, path)

    def export_huggingface(self, out_dir: str | Path) -> Path:
        if self.segmentation is not None:  # DetrForSegmentation
            from .weights.panoptic import save_hf_segmentation

            return save_hf_segmentation(self.segmentation.state_dict(), self.config, out_dir)
        return huggingface.save_huggingface(self.model.state_dict(), self.config, out_dir)

    # ---- inference ----------------------------------------------------------------------------
    def preprocess(self, images: Any) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """-> ImageNet-normalised [3,h,w] tensors at inference size, and the original (h, w) sizes."""
        tensors, sizes = [], []
        for image in _as_list(images):
            t = _as_float_image(image)
            h, w = t.shape[-2:]
            size = resized_shape(h, w, self.config.image_size, self.config.max_image_size)
            if size != (h, w):
                t = TF.resize(t, list(size), antialias=True)
            tensors.append(TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD).to(self.device))
            sizes.append((h, w))
        return tensors, sizes

    @torch.no_grad()
    def predict(self, images: Any, threshold: float | None = 0.5, top_k: int | None = None,
                batch_size: int = 4, task: str = "detection", panoptic_threshold: float = 0.85) -> list:
        """One `Detections` per image (boxes in pixels of the original image). Results do not depend
        on batch_size: each image is computed as if alone.
        task="panoptic" (weights with a mask head): one `PanopticResult` per image instead (segment
        ids at the original size + segments_info), queries kept above `panoptic_threshold` (paper: 0.85)."""
        if task == "panoptic":
            return self._predict_panoptic(images, panoptic_threshold)
        if task != "detection":
            raise ValueError(f"task must be 'detection' or 'panoptic', got {task!r}")
        items = _as_list(images)
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            tensors, sizes = self.preprocess(items[start: start + batch_size])
            out = self._inference_model()(tensors, batch_invariant=True)
            for r, size in zip(postprocess(out["pred_logits"], out["pred_boxes"], sizes, threshold, top_k), sizes):
                labels = r["labels"].cpu()
                results.append(Detections(
                    boxes=r["boxes"].cpu(), scores=r["scores"].cpu(), labels=labels,
                    category_ids=[self.config.category_ids[i] for i in labels.tolist()],
                    label_names=[self.config.class_names[i] for i in labels.tolist()],
                    image_size=size,
                ))
        return results


    def _predict_panoptic(self, images: Any, threshold: float) -> list:
        if self.segmentation is None:
            raise ValueError("these weights have no mask head: panoptic prediction needs panoptic weights "
                             "(e.g. detr-r50-panoptic, or a model trained with the mask head)")
        from .engine.panoptic import predict_panoptic

        results = []
        for image in _as_list(images):
            tensors, sizes = self.preprocess([image])
            res, _ = predict_panoptic(self.segmentation, self.config, tensors[0], sizes[0], threshold)
            results.append(res)
        return results


def _as_list(images: Any) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images)
    return [images]


def load_weights(source: str | Path, dilation: bool | None = None) -> tuple[dict[str, Tensor], ModelConfig]:
    """Any supported weights -> (our state dict, ModelConfig). Never unpickles code."""
    if isinstance(source, str) and source in hub.PUBLISHED and not Path(source).exists():
        path = hub.published_path(source)
        if dilation is None:
            dilation = "dc5" in source
        return authors.load_authors(path, dilation=dilation)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory, and not a published model name "
                                f"({', '.join(sorted(hub.PUBLISHED))})")
    if path.is_dir():
        if native.is_native(path):
            return native.load_native(path)
        if huggingface.is_huggingface_dir(path):
            return huggingface.load_huggingface(path)
        raise ValueError(f"{path}: neither a detrkit directory (model.safetensors + config.json) "
                         "nor a Hugging Face DETR directory (config.json with model_type 'detr')")
    if path.suffix == ".safetensors":
        return native.load_native(path)
    return authors.load_authors(path, dilation=dilation)
