"""Training checkpoints, to resume a run: one plain dict per step, written atomically, the last N kept.

Layout under the run's output folder::

    checkpoints/step-00001000/state.pt                 # the checkpoint dict (torch.save)
    checkpoints/step-00001000/pytorch_lora_weights.safetensors   # the adapter so far, ready to use

A checkpoint folder is assembled under a hidden temporary name and renamed into place once its
files are complete (a rename is atomic), and older checkpoints are deleted only after that, so a
run killed at any moment leaves the previous checkpoints intact and no half-written file under a
real name. Writing a step that already has a checkpoint (a resumed run passing it again) never
deletes the old folder first: it is renamed aside (``.old-*``), the new one renamed into place,
and only then is the old one deleted. On the next start (``recover_interrupted``) an aside folder
whose step has no checkpoint (the run was killed between the two renames) is put back, other
aside folders and the temporary folders of a killed run are deleted.

The dict (``state.pt``, read with ``torch.load(weights_only=True)``) holds: "step", "config" (the
resolved TrainConfig as a dict), "world_size", "lora" (peft state dict of the trainable weights),
"optimizer", "lr_scheduler", "rng" (torch's global CPU generator; the data order and the per-step
generators are functions of (seed, step) and need no state) and "versions"; a full fine-tune
(``full_finetune``) also "unet", the UNet's own weights under plain diffusers keys.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step-(\d{8})$")
_TEMP, _ASIDE = ".tmp-", ".old-"  # hidden prefixes: a checkpoint being written, one being replaced


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def recover_interrupted(output_dir: str | os.PathLike) -> None:
    """Clean up after a run killed while writing a checkpoint (call before listing checkpoints).

    An aside folder (``.old-step-N-*``) whose step has no checkpoint is complete (it was published
    before) and is renamed back; other aside folders and temporary folders (``.tmp-*``, possibly
    half-written) are deleted.
    """
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(_ASIDE + "*")):
        final = folder / path.name[len(_ASIDE):].rsplit("-", 1)[0]
        if _NAME.match(final.name) and not final.exists() and (path / STATE_FILE).is_file():
            logger.warning("restoring checkpoint %s, moved aside by a run interrupted while replacing it",
                           final.name)
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(_TEMP + "*"):
        logger.warning("removing incomplete checkpoint %s left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(output_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint folder to resume from: None, 'latest' (None if the run has none yet) or a path.

    A path may name a checkpoint folder, its state.pt, or a run's output folder (its latest one).
    """
    if resume is None:
        return None
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file() and path.name == STATE_FILE:
        return path.parent
    if (path / STATE_FILE).is_file():
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise FileNotFoundError(f"resume: {path} is not a checkpoint (a folder with {STATE_FILE}) nor a run "
                            "folder holding checkpoints; pass 'latest' or such a path")


def load_checkpoint(folder: str | os.PathLike) -> dict:
    """The checkpoint dict of a checkpoint folder (tensors on the CPU)."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); resume from an older one") from err


def save_checkpoint(output_dir: str | os.PathLike, state: dict, write_extra=None, keep: int = 3) -> Path:
    """Write `state` as checkpoint folder step-{state['step']}, atomically; keep the newest `keep`.

    Args:
        output_dir: the run's folder.
        state: the checkpoint dict (must hold "step").
        write_extra: optional ``write_extra(folder)`` writing more files into the folder before it
            is published (the adapter so far).
        keep: complete checkpoints kept; older ones are deleted after the new one is in place.

    Returns:
        the checkpoint folder.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state["step"])
    suffix = uuid.uuid4().hex[:8]
    temp, aside = root / f"{_TEMP}{final.name}-{suffix}", root / f"{_ASIDE}{final.name}-{suffix}"
    temp.mkdir()
    try:
        with open(temp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if write_extra is not None:
            write_extra(temp)
        if final.exists():  # the same step written again (a resumed run passing it once more)
            os.rename(final, aside)  # never delete before the new one is in place
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
