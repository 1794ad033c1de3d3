"""DMP dense prediction on Stable Diffusion 1.x (Lee et al., CVPR 2024): the engine.

This package knows nothing of ComfyUI; the node pack and the trainer are thin layers on it.
"""

from .adapters import AdapterInfo
from .prediction.predict import Prediction, PredictOptions, predict_images
from .sampling import PREDICTION_TYPES, SAMPLERS, SPACINGS, get_timesteps, sample_dmp
from .sd.model import DMPModel
from .tasks.codecs import TASKS, get_codec

__all__ = [
    "AdapterInfo",
    "DMPModel",
    "PREDICTION_TYPES",
    "Prediction",
    "PredictOptions",
    "SAMPLERS",
    "SPACINGS",
    "TASKS",
    "get_codec",
    "get_timesteps",
    "predict_images",
    "sample_dmp",
]
