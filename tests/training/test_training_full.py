"""The trainer's full fine-tune (``full_finetune``): every UNet weight trains, resumes exactly, and is
written as a diffusers UNet folder that predicts what validation measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmp_model import DMPModel
from training import TrainConfig, train
from training.demo.world import write_dataset
from training.resume import list_checkpoints, load_checkpoint
from training.trainer import ADAPTER_NAME, FULL_UNET_FOLDER, build_datasets, load_validation, validate


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("world") / "train", 8, size=32, seed=0)


def full_config(base: Path, world: Path, out: Path, **changes) -> TrainConfig:
    values = dict(base=str(base), train_images=str(world / "images"), train_targets=str(world / "depth"),
                  task="depth", output_dir=str(out), resolution=32, batch_size=2, max_steps=4, learning_rate=1e-3,
                  warmup_steps=1, checkpoint_every=2, keep_checkpoints=2, val_every=0, val_split=2, val_limit=2,
                  val_previews=0, val_steps=2, log_every=1, rank=2, seed=1, full_finetune=True)
    values.update(changes)
    return TrainConfig(**values)


def _unet(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder)


def test_full_finetune_changes_the_unet_and_its_folder_predicts_as_validated(tiny_base, world, tmp_path):
    result = train(full_config(tiny_base, world, tmp_path / "full"))
    tuned, original = _unet(tmp_path / "full" / FULL_UNET_FOLDER), _unet(tiny_base / "unet")
    conv = "down_blocks.0.resnets.0.conv1.weight"  # not an attention projection: the LoRA cannot reach it
    assert not torch.equal(tuned.state_dict()[conv], original.state_dict()[conv])
    assert tuned.state_dict().keys() == original.state_dict().keys()  # plain diffusers keys, no peft names

    # The fine-tuned UNet plus the adapter, loaded as any user would, predicts what validation measured.
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    model.unet.load_state_dict(tuned.state_dict())
    model.load_adapter(tmp_path / "full", name=ADAPTER_NAME)  # validate() predicts with the trainer's name
    config = full_config(tiny_base, world, tmp_path / "full")
    val = load_validation(build_datasets(config, log=False)[1], config.val_limit)
    # Weights from files and merged again: at most rounding (~1e-7 relative; equal here), far below 1e-5.
    assert validate(model, val, config, None)["abs_rel"] == pytest.approx(result.metrics["abs_rel"], rel=1e-5)


def test_lora_training_leaves_the_unet_alone(tiny_base, world, tmp_path):
    train(full_config(tiny_base, world, tmp_path / "lora", full_finetune=False, max_steps=2))
    assert not (tmp_path / "lora" / FULL_UNET_FOLDER).exists()
    assert "unet" not in load_checkpoint(list_checkpoints(tmp_path / "lora")[-1])


def test_full_finetune_resumes_exactly(tiny_base, world, tmp_path):
    train(full_config(tiny_base, world, tmp_path / "straight"))

    def crash(step):
        if step == 3:
            raise Crash("killed between steps")

    crashed = full_config(tiny_base, world, tmp_path / "crashed")
    with pytest.raises(Crash):
        train(crashed, on_step=crash)
    train(crashed, resume="latest")
    a, b = (load_checkpoint(list_checkpoints(tmp_path / name)[-1]) for name in ("straight", "crashed"))
    # Bit for bit by construction: the resumed run restores every state and repeats the same operations.
    assert a["unet"].keys() == b["unet"].keys() and len(a["unet"]) > len(a["lora"])
    for key in a["unet"]:
        assert torch.equal(a["unet"][key], b["unet"][key]), key
    for key in a["lora"]:
        assert torch.equal(a["lora"][key], b["lora"][key]), key
