"""Finding training pairs: images matched with targets by name, and their captions.

Layout: a folder of input images and a folder of targets, matched by their path relative to the
folder without the extension (``images/a/001.png`` pairs with ``targets/a/001.npy``). Captions
come from ``metadata.jsonl`` in the images folder (Hugging Face ImageFolder: one JSON object per
line with "file_name" and "text") or from a ``.txt`` file beside each image. Pairs with one side
missing are skipped and reported by name, never silently.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dmp_model.images import IMAGE_EXTENSIONS

from .targets import ACCEPTED_KINDS, TARGET_EXTENSIONS, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """One training example: `name` is the relative path without extension."""

    name: str
    image: Path
    target: Path
    caption: str = ""


def _index_files(folder: Path, extensions: tuple[str, ...], role: str) -> tuple[dict[str, Path], list[str]]:
    """{relative stem: file} for the files with these extensions; duplicates are reported."""
    if not folder.is_dir():
        raise DataError(f"{role} folder not found: {folder}")
    index: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            stem = path.relative_to(folder).with_suffix("").as_posix()
            if stem in index:
                duplicates.append(f"{stem} ({index[stem].name} and {path.name})")
            else:
                index[stem] = path
    return index, duplicates


def read_captions(images_dir: Path) -> dict[str, str]:
    """Captions by relative stem, from metadata.jsonl ("file_name" + "text" or "caption") or .txt files."""
    captions: dict[str, str] = {}
    metadata = images_dir / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text", row.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{metadata}, line {number}: expected a JSON object with 'file_name' and "
                                f"'text', got {line[:80]!r} ({err})") from err
            if not isinstance(text, str):
                raise DataError(f"{metadata}, line {number}: 'text' must be a string, got {text!r}")
            captions[Path(name).with_suffix("").as_posix()] = text
    for path in sorted(images_dir.rglob("*.txt")):
        captions.setdefault(path.relative_to(images_dir).with_suffix("").as_posix(),
                            path.read_text(encoding="utf-8").strip())
    return captions


def find_pairs(images_dir: str | os.PathLike, targets_dir: str | os.PathLike, task: str,
               with_captions: bool = False, role: str = "train") -> tuple[list[Pair], list[str]]:
    """Match images and targets by relative stem.

    Returns:
        (pairs sorted by name, problems: one readable line per skipped file).
    Raises:
        DataError: a folder is missing or empty, or no name matches.
    """
    images_dir, targets_dir = Path(images_dir), Path(targets_dir)
    images, image_dups = _index_files(images_dir, IMAGE_EXTENSIONS, f"{role} images")
    targets, target_dups = _index_files(targets_dir, TARGET_EXTENSIONS[task], f"{role} targets")
    if not images:
        raise DataError(f"{role} images folder {images_dir} holds no images (extensions {IMAGE_EXTENSIONS})")
    if not targets:
        raise DataError(f"{role} targets folder {targets_dir} holds no {task} targets "
                        f"(extensions {TARGET_EXTENSIONS[task]}; expected {ACCEPTED_KINDS[task]})")
    common = sorted(set(images) & set(targets))
    if not common:
        raise DataError(f"no {role} image has a target of the same name: images are named like "
                        f"{sorted(images)[:3]}, targets like {sorted(targets)[:3]} "
                        f"(in {images_dir} and {targets_dir})")
    lonely, orphans = sorted(images.keys() - targets), sorted(targets.keys() - images)
    problems = [f"{name}: image without a target in {targets_dir}" for name in lonely]
    problems += [f"{name}: target without an image in {images_dir}" for name in orphans]
    problems += [f"{d}: several files share this name; skipped" for d in image_dups + target_dups]
    duplicated = {d.split(" (")[0] for d in image_dups + target_dups}
    captions = read_captions(images_dir) if with_captions else {}
    missing_captions = [name for name in common if with_captions and name not in captions]
    if missing_captions:
        logger.warning("%d %s images have no caption and are trained with the empty prompt, e.g. %s",
                       len(missing_captions), role, missing_captions[:5])
    pairs = [Pair(name, images[name], targets[name], captions.get(name, "")) for name in common
             if name not in duplicated]
    return pairs, problems
