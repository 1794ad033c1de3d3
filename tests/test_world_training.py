"""Training on the miniature world lowers held-out error far below the untrained adapter's.

The same code path as `dmp demo` and `dmp train`, at a size that runs in well under a minute:
32 px scenes, a briefly pre-trained tiny VAE, a depth adapter trained for 80 steps.
"""

from __future__ import annotations

import torch

from dmp_model import DMPModel
from training import TrainConfig, train
from training.data import adapter_info
from training.demo import DemoSettings, build_world_base
from training.metrics import constant_depth_abs_rel
from training.trainer import ADAPTER_NAME, add_lora, build_datasets, load_validation, validate
from training.world import write_dataset


def test_training_on_the_world_beats_the_untrained_adapter(tmp_path):
    settings = DemoSettings(size=32, train_scenes=48, val_scenes=8, vae_steps=250, seed=3)
    train_dir = write_dataset(tmp_path / "world" / "train", settings.train_scenes, settings.size,
                              settings.seed)
    val_dir = write_dataset(tmp_path / "world" / "val", settings.val_scenes, settings.size, settings.seed,
                            start=1_000_000)
    names = [f"{i:05d}" for i in range(settings.train_scenes)]
    build_world_base(tmp_path / "base", train_dir, names, settings)
    config = TrainConfig(base=str(tmp_path / "base"), train_images=str(train_dir / "images"),
                         train_targets=str(train_dir / "depth"), val_images=str(val_dir / "images"),
                         val_targets=str(val_dir / "depth"), output_dir=str(tmp_path / "depth"),
                         resolution=32,
                         rank=8, prediction_type="sample", learning_rate=3e-3, warmup_steps=10, max_steps=150,
                         batch_size=8, cache_latents=True, checkpoint_every=0, val_every=0, val_limit=8,
                         seed=settings.seed)

    # The untrained adapter (LoRA up-weights start at zero), evaluated exactly as the trainer does.
    _, val_set = build_datasets(config, log=False)
    val = load_validation(val_set, config.val_limit)
    model = DMPModel.from_pretrained(config.base, device="cpu", precision="fp32")
    add_lora(model.unet, config)
    model.register_adapter(ADAPTER_NAME, adapter_info(config))
    untrained = validate(model, val, config, None)["abs_rel"]

    trained = train(config).metrics["abs_rel"]
    _, constant = constant_depth_abs_rel(val.raws)
    assert trained < 0.6 * untrained, (trained, untrained)
    assert trained < constant, (trained, constant)
    assert torch.isfinite(torch.tensor(trained))
