"""The training and validation sets: every pair checked once before training, then read as tensors.

Every pair is read once before training starts (``check_pairs``): targets of the wrong kind for
the task are an error naming the files and the accepted kinds; unreadable or mismatched pairs
(different aspect ratios) are skipped and reported by name, never silently.
"""

from __future__ import annotations

import logging

import torch

from dmp_model.images import load_image

from ..config import TrainConfig
from .pairs import Pair, find_pairs
from .targets import ACCEPTED_KINDS, DataError, TargetKindError, read_target
from .transforms import encode_target, fit, fit_target, flip_target

logger = logging.getLogger(__name__)


def check_pairs(pairs: list[Pair], config: TrainConfig, role: str = "train") -> tuple[list[Pair], list[str]]:
    """Read every pair once; returns (usable pairs, problems of the skipped ones).

    Raises:
        DataError: some targets are of the wrong kind for the task (all of them are listed, up to 5),
            or no pair is usable.
    """
    usable, problems, wrong_kind = [], [], []
    for pair in pairs:
        try:
            image = load_image(pair.image)
            target = read_target(pair.target, config.task, config)
        except TargetKindError as err:
            wrong_kind.append(str(err))
            continue
        except (ValueError, OSError, EOFError, RuntimeError) as err:
            problems.append(f"{pair.name}: unreadable ({err})")
            continue
        (h, w), (th, tw) = image.shape[-2:], target.shape[:2]
        if abs(h / w - th / tw) > 0.01:
            problems.append(f"{pair.name}: image is {w}x{h} but target {tw}x{th} (aspect ratios differ)")
            continue
        if config.task == "depth" and float(target.max()) > config.resolved_target_scale:
            logger.debug("%s: depth beyond target_scale is clamped", pair.name)
        usable.append(pair)
    if wrong_kind:
        raise DataError(f"{len(wrong_kind)} {role} targets are not {config.task} targets; "
                        f"{config.task} takes {ACCEPTED_KINDS[config.task]}: " + "; ".join(wrong_kind[:5]))
    if not usable:
        raise DataError(f"no usable {role} pairs: " + "; ".join(problems[:5]))
    return usable, problems


class PairDataset(torch.utils.data.Dataset):
    """Pairs at the training resolution; items are addressed as (index, flip).

    Returns dicts with "image" [3, R, R] and "target" [3, R, R] (both in [-1, 1], the target through
    the task codec), "raw" (the raw target at R, for metrics) and "caption".
    """

    def __init__(self, pairs: list[Pair], config: TrainConfig):
        self.pairs, self.config = pairs, config

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [3, R, R] in [0, 1], raw target at R), unflipped."""
        pair, config = self.pairs[index], self.config
        image = fit(load_image(pair.image), config.resolution, config.crop).clamp(0, 1)
        target = read_target(pair.target, config.task, config)
        return image, fit_target(target, config.task, config.resolution, config.crop)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        image, raw = self.load(index)
        if flip:
            image, raw = image.flip(-1), flip_target(raw, self.config.task)
        return {"image": image * 2 - 1, "target": encode_target(raw, self.config), "raw": raw,
                "caption": self.pairs[index].caption, "index": index, "flip": flip}


def build_datasets(config: TrainConfig, log: bool = True) -> tuple[PairDataset, PairDataset]:
    """Training and validation datasets; skipped pairs are logged by name with a count."""
    pairs, problems = find_pairs(config.train_images, config.train_targets, config.task, config.captions)
    if config.val_images is not None:
        val_pairs, val_problems = find_pairs(config.val_images, config.val_targets, config.task,
                                             config.captions, role="validation")
        val_pairs, more = check_pairs(val_pairs, config, "validation")
        problems += val_problems + more
    pairs, more = check_pairs(pairs, config)
    problems += more
    if config.val_images is None:
        if config.val_split >= len(pairs):
            raise DataError(f"val_split={config.val_split} would hold out all {len(pairs)} usable training "
                            "pairs; lower it or give --val-images/--val-targets")
        held = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed))
                   [:config.val_split].tolist())
        val_pairs = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
        if not val_pairs:
            logger.warning("no validation pairs (val_split=0): validation is skipped")
    if problems and log:
        logger.warning("skipped %d pairs: %s", len(problems), "; ".join(problems[:20])
                       + (f"; ... ({len(problems) - 20} more)" if len(problems) > 20 else ""))
    if log:
        logger.info("%d training pairs, %d validation pairs (%s)", len(pairs), len(val_pairs), config.task)
    return PairDataset(pairs, config), PairDataset(val_pairs, config)


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep captions/indices/flips as lists."""
    out = {key: torch.stack([item[key] for item in items]) for key in ("image", "target", "raw")}
    out.update({key: [item[key] for item in items] for key in ("caption", "index", "flip")})
    return out
