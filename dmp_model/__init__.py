"""DMP dense prediction on Stable Diffusion 1.x (Lee et al., CVPR 2024): the engine.

This package knows nothing of ComfyUI; the node pack and the trainer are thin layers on it.
``DMPModel`` (the diffusers backend, ``sd/``) is imported when it is first asked for, so that the
node pack, which runs on ComfyUI's own models, never loads the model libraries' layer.
"""

from .adapters import AdapterInfo
from .prediction.predict import Prediction, PredictOptions, predict_images
from .sampling import PREDICTION_TYPES, SAMPLERS, SPACINGS, get_timesteps, sample_dmp
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


def __getattr__(name: str):
    if name == "DMPModel":
        from .sd.model import DMPModel

        return DMPModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
