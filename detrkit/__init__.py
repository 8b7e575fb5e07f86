"""detrkit: DETR (DEtection TRansformer), faithful to the paper, fast, and pleasant on your own data."""
from .config import PRESETS, ModelConfig, TrainConfig, get_preset
from .detector import Detector
from .model import DETR, build_model
from .postprocess import Detections

__all__ = ["DETR", "Detector", "Detections", "ModelConfig", "PRESETS", "TrainConfig", "build_model", "get_preset"]
__version__ = "0.1.0"
