"""Training DMP task adapters (LoRA on an SD 1.x UNet) with the engine's objective, headless.

``dmp train`` / ``train(TrainConfig(...))`` for real data; ``dmp demo`` for the miniature world
(``training.demo.world``), which proves the loop learns on a CPU in minutes. Depends on ``dmp_model``;
``dmp_model`` never imports this package.
"""

from .config import TrainConfig
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
