"""What became of every input file of a `dmp predict` run: the summary, and the --report file.

Each input file ends in exactly one status (OUTCOMES):

- ``written``: all of its outputs were written (as one set: see ``writers.write_predictions``);
- ``skipped``: its outputs were there from an earlier run (nothing recomputed without --overwrite);
- ``failed``: a one-line reason names the file; nothing of it was written;
- ``ignored``: found in a folder but not an input (another extension, a hidden file, ...), with the reason.

``--report FILE`` writes one JSON object a line as each file ends (so a long run's report is
readable while it runs and survives an interruption): ``{"file", "status", "reason", "outputs"}``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

logger = logging.getLogger("dmp")

OUTCOMES = ("written", "skipped", "failed", "ignored")
_NAMED_FAILURES = 20  # failed files named in the summary; the report lists them all


def report_path(path: str | None, rank: int, world: int) -> Path | None:
    """This process's report file: FILE itself, or FILE with ".rankN" before its suffix when several
    processes share the run (each writes its own)."""
    if not path:
        return None
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class RunReport:
    """Counts outcomes, logs failures as they happen, and streams the --report file."""

    def __init__(self, path: Path | None = None):
        self.counts: Counter[str] = Counter()
        self.failed: list[Path] = []
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")  # open for the whole run

    def record(self, file: Path, status: str, reason: str | None = None, outputs: Sequence[Path] = ()) -> None:
        """One file's outcome (one of OUTCOMES)."""
        if status not in OUTCOMES:
            raise ValueError(f"status must be one of {OUTCOMES}, got {status!r}")
        self.counts[status] += 1
        if status == "failed":
            self.failed.append(file)
            logger.error("%s: %s", file, reason)
        elif status == "ignored":
            logger.info("%s: ignored: %s", file, reason)
        if self._file is not None:
            line = {"file": str(file), "status": status, "reason": reason, "outputs": [str(p) for p in outputs]}
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def summarise(self, rank: int, world: int) -> None:
        """The closing lines: counts per outcome, then the failed files by name."""
        logger.info("process %d/%d: %d written, %d skipped (already there), %d failed, %d ignored (not inputs)",
                    rank + 1, world, self.counts["written"], self.counts["skipped"], self.counts["failed"],
                    self.counts["ignored"])
        if self.failed:
            names = ", ".join(str(f) for f in self.failed[:_NAMED_FAILURES])
            more = len(self.failed) - _NAMED_FAILURES
            logger.error("failed: %s%s", names, f" and {more} more (--report lists every file)" if more > 0 else "")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
