"""The DETR network: backbone, position embeddings, transformer, heads."""
from .detr import DETR, MLP, build_model, pad_images

__all__ = ["DETR", "MLP", "build_model", "pad_images"]
