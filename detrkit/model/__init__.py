"""The DETR network: backbone, position embeddings, transformer, heads."""
from .detr import DETR, MLP, BackboneFeatures, Encoded, as_batch, build_model, pad_images

__all__ = ["DETR", "MLP", "BackboneFeatures", "Encoded", "as_batch", "build_model", "pad_images"]
