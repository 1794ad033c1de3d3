"""Training on the miniature world lowers held-out error far below the untrained adapter's.

The same code path as `dmp demo` and `dmp train`, at a size that runs in well under a minute:
32 px scenes, a briefly pre-trained tiny VAE, a depth adapter trained for 80 steps.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from dmp_model import DMPModel
from dmp_model.adapters import save_adapter
from dmp_model.controlnet import convert_normals
from training import TrainConfig, train
from training.data import adapter_info, encode_target, read_target
from training.demo import DemoSettings, adapter_config, build_world_base, evaluate, load_pixels
from training.metrics import constant_depth_abs_rel
from training.trainer import (ADAPTER_FILE, ADAPTER_NAME, add_lora, build_datasets, load_validation, lora_state_dict,
                              validate)
from training.world import NORMAL_CONVENTION, write_dataset


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


def test_the_demo_encodes_and_evaluates_with_the_callers_settings(tiny_base, tmp_path):
    """The VAE's pre-training pixels are exactly the trainer's target images (one encoding: the engine's
    codecs, depth clamped at the target scale), and evaluation uses the settings and adapter facts it is
    given: the depth scale of the sheet, the normal adapter's convention for the truth."""
    out = tmp_path / "demo"
    settings = DemoSettings(size=32, val_scenes=2, target_scale=4.0)  # world depths reach past 4 m
    write_dataset(out / "world" / "train", 3, settings.size, settings.seed)
    write_dataset(out / "world" / "val", 2, settings.size, settings.seed, start=1_000_000)
    names = ["00000", "00001", "00002"]

    _, depths, normals = load_pixels(out / "world" / "train", names, settings.target_scale)
    for task, pixels in (("depth", depths), ("normal", normals)):
        config = adapter_config(out, task, 1, settings)
        suffix = ".npy" if task == "depth" else ".png"
        expected = torch.stack([encode_target(read_target(out / "world" / "train" / task / f"{n}{suffix}", task,
                                                          config), config) for n in names])
        torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    metres = torch.stack([torch.from_numpy(np.load(out / "world" / "train" / "depth" / f"{n}.npy"))
                          for n in names])
    assert metres.max() > 4.0 and depths.max() == 1.0  # clamped at the target scale, as in training

    shutil.copytree(tiny_base, out / "base")
    for task in ("depth", "normal"):
        config = adapter_config(out, task, 1, settings)
        if task == "normal":  # an adapter learning another frame than the world's files
            config = replace(config, adapter_normal_convention="marigold")
        unet = DMPModel.from_pretrained(out / "base", device="cpu", precision="fp32").unet
        add_lora(unet, config)
        save_adapter(out / task / ADAPTER_FILE, lora_state_dict(unet), adapter_info(config, 1))
    val_names = ["1000000", "1000001"]
    summary = evaluate(out, val_names, settings)
    assert summary["held_out_scenes"] == 2 and "abs_rel" in summary["depth"]["dmp_default"]

    with Image.open(out / "results.png") as image:
        sheet = np.asarray(image).astype(np.float64) / 255  # rows of 32 px: input | depth | truth | normals...
    size = settings.size
    truth = np.load(out / "world" / "val" / "depth" / f"{val_names[0]}.npy")
    np.testing.assert_allclose(sheet[:size, 2 * size:3 * size, 0], np.clip(1 - truth / 4.0, 0, 1), atol=1 / 255)
    with Image.open(out / "world" / "val" / "normal" / f"{val_names[0]}.png") as image:
        world_rgb = torch.from_numpy(np.asarray(image).astype(np.float32) / 255)
    marigold = convert_normals(world_rgb[None] * 2 - 1, NORMAL_CONVENTION, "marigold")[0]
    np.testing.assert_allclose(sheet[:size, 4 * size:, :], ((marigold + 1) / 2).numpy(), atol=2 / 255)
