"""`Detector`: a DETR model with its config, ready to load weights and detect objects."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .config import ModelConfig, TrainConfig
from .data.transforms import resize_for_inference
from .model import DETR, build_model
from .postprocess import Detections, postprocess
from .weights import huggingface, native
from .weights.load import model_from_weights


def _as_pil(image: Any) -> Image.Image:
    """path | PIL | numpy HWC/HW | tensor CHW/HW (uint8, or float in [0,1]) -> an RGB PIL image.

    Every kind becomes 8-bit RGB, the form a file is evaluated in, so that one resize serves all."""
    if isinstance(image, (str, Path)):
        from .data.images import load_image  # upright (EXIF), RGB, robust to odd modes

        return load_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
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
    if t.is_floating_point():
        t = (t.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ValueError(f"integer images must be uint8, got {t.dtype}")
    return TF.to_pil_image(t.cpu())


class Detector:
    """Load weights, detect objects.

    >>> det = Detector.from_pretrained("detr-r50")
    >>> [result] = det.predict("street.jpg", threshold=0.7)
    >>> result.boxes, result.scores, result.label_names
    """

    def __init__(self, model: DETR, config: ModelConfig | None = None, device: str | torch.device = "cpu",
                 precision: str = "float32"):
        """precision: "float32" (the reference numbers), "bf16" (autocast; same top detections,
        several times faster on CPUs with AMX, 2-3x with AVX-512 bf16, and on GPUs) or "auto" (bf16
        where it is fast)."""
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

    @property
    def inference_model(self) -> torch.nn.Module:
        """What `predict` runs: an optimised copy of `self.model` (batch norm folded into convolutions,
        packed oneDNN kernels on CPU, bf16 weights when asked), rebuilt whenever the weights or device
        change. Any other module (a stand-in in tests, a wrapper of the user's) runs as it is."""
        if type(self.model) is not DETR:
            return self.model
        key = (self.precision, self.device, self.model.weights_version())
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
        """Anything `weights.load.load_weights` takes: a native dir/.safetensors, an authors' .pth, a Hugging
        Face dir, a training checkpoint or run folder, or a published name. Panoptic weights (with a mask
        head) also give `predict(..., task="panoptic")`."""
        from .weights.panoptic import is_panoptic, load_panoptic_weights  # panoptic layouts, then load_weights

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
        model = model_from_weights(sd, cfg, source)
        return cls(model, cfg, device=device, precision=precision)

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device = "cpu", precision: str = "float32",
                    **settings: Any) -> "Detector":
        """An untrained detector of a named preset, ready to `train`. settings: ModelConfig or TrainConfig
        fields by name (num_queries=50, lr=2e-4, "model.image_size"...), as `--set` takes them. Its
        classes come from the data `train` is given."""
        from .config import apply_overrides, get_preset

        preset = get_preset(name)
        model_cfg, train_cfg = apply_overrides(preset.model, preset.train, settings, "Detector.from_preset")
        det = cls.from_config(model_cfg.with_classes(model_cfg.class_names or ["object"]), device=device,
                              precision=precision)
        det.train_config = train_cfg
        return det

    def train(self, data, val=None, out: str | Path = "runs/train", *, max_minutes: float | None = None,
              max_steps: int | None = None, epochs: int | None = None, val_fraction: float = 0.1,
              resume: bool = False, weights: str | Path | None = None, plots: bool = True,
              **train_args: Any) -> dict[str, Any]:
        """Train on `data` (COCO JSON, YOLO or VOC folder, or a DatasetIndex) as `detrkit train` does, then
        hold the trained weights (the run's best/, else final/). -> the last evaluation's metrics plus
        "run_dir", "status", "step", "best_AP" and "seconds".

        val: validation data (default: the dataset's val split, else `val_fraction` of the images held out);
        out: the run folder (a numbered sibling if it holds another run, unless resume); weights: fine-tune
        from these instead of this detector's own start; train_args: the rest of `engine.train.train`'s
        keyword arguments (images_dir, split, ...)."""
        import dataclasses

        from .engine.train import train
        from .weights.load import load_model

        train_cfg = getattr(self, "train_config", None) or TrainConfig()
        changes = {k: v for k, v in (("max_minutes", max_minutes), ("max_steps", max_steps), ("epochs", epochs))
                   if v is not None}
        train_cfg = dataclasses.replace(train_cfg, **changes)
        result = train(self.config, train_cfg, data, val, out, device=str(self.device), resume=resume,
                       init_weights=weights, val_fraction=val_fraction if val is None else 0.0, plots=plots,
                       **train_args)
        if result.status != "interrupted":
            self.model, self.config = load_model(result.run_dir, device=self.device)
            self._runner = None
        return {**result.metrics, "run_dir": result.run_dir, "status": result.status, "step": result.step,
                "best_AP": result.best_ap, "seconds": result.seconds}

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
        """-> ImageNet-normalised [3,h,w] tensors at inference size (on the device), and the original
        (h, w) sizes. The resize is the evaluation's (`resize_for_inference`)."""
        tensors, sizes = [], []
        for image in _as_list(images):
            pil = _as_pil(image)
            x = resize_for_inference(pil, self.config.image_size, self.config.max_image_size)
            tensors.append(x.to(self.device))
            sizes.append((pil.height, pil.width))
        return tensors, sizes

    @torch.no_grad()
    def predict(self, images: Any, threshold: float | None = 0.5, top_k: int | None = None,
                batch_size: int = 4, task: str = "detection", panoptic_threshold: float | None = None) -> list:
        """One `Detections` per image (boxes in pixels of the original image). Results do not depend
        on batch_size: each image is computed as if alone.
        task="panoptic" (weights with a mask head): one `PanopticResult` per image instead (segment
        ids at the original size + segments_info), queries kept above `panoptic_threshold` (default: the
        model's own, `config.panoptic_threshold`: the paper's 0.85 unless it was chosen on held-out images)."""
        if task == "panoptic":
            return self._predict_panoptic(images, panoptic_threshold)
        if task != "detection":
            raise ValueError(f"task must be 'detection' or 'panoptic', got {task!r}")
        return list(self.predict_iter(_as_list(images), threshold, top_k, batch_size))

    def predict_iter(self, images: Iterable[Any], threshold: float | None = 0.5, top_k: int | None = None,
                     batch_size: int = 4) -> Iterator[Detections]:
        """`predict` over any iterable, read lazily in batches of `batch_size`: one `Detections` per
        image, in order. The one inference loop (predict, eval, the main job's pictures)."""
        batch: list = []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                yield from self._detect(batch, threshold, top_k)
                batch = []
        if batch:
            yield from self._detect(batch, threshold, top_k)

    @torch.no_grad()
    def _detect(self, batch: list, threshold: float | None, top_k: int | None) -> list[Detections]:
        tensors, sizes = self.preprocess(batch)
        out = self.inference_model(tensors, batch_invariant=True)
        results = []
        for r, size, image in zip(postprocess(out["pred_logits"], out["pred_boxes"], sizes, threshold, top_k,
                                                 self.config.duplicate_iou, self.config.classes_per_query), sizes,
                                  batch):
            labels = r["labels"].cpu()
            results.append(Detections(
                boxes=r["boxes"].cpu(), scores=r["scores"].cpu(), labels=labels,
                category_ids=[self.config.category_ids[i] for i in labels.tolist()],
                label_names=[self.config.class_names[i] for i in labels.tolist()],
                image_size=size, image=image,  # for Detections.plot / .save
            ))
        return results


    def _predict_panoptic(self, images: Any, threshold: float | None) -> list:
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
