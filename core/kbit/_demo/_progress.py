"""Training progress: a redrawn bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows ``step/total`` and the loss (or a short status) while a long run works.

    On an interactive terminal one line is redrawn in place as a bar; when output goes to
    a file or a pipe (CI logs), a plain line is printed every ``every`` steps instead, so
    logs stay readable.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every: int = 10) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stdout
        self.every = max(1, every)
        self.interactive = self.stream.isatty()
        self.started = time.perf_counter()
        self._drawn = 0

    def update(self, step: int, loss: float | None = None, status: str = "") -> None:
        """Report that ``step`` (1-based) finished, with its ``loss`` or a ``status`` line."""
        detail = f"loss {loss:7.4f}" if loss is not None else status
        if self.interactive:
            width = 30
            filled = width * step // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            line = f"{self.label:<24} [{bar}] {step:>4}/{self.total} {detail}"
            self.stream.write("\r" + line.ljust(self._drawn))  # blank what a longer line left
            self._drawn = len(line)
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step in (1, self.total):
            elapsed = time.perf_counter() - self.started
            detail = f"loss {loss:.4f}" if loss is not None else status
            self.stream.write(f"{self.label}: step {step}/{self.total} {detail} ({elapsed:.1f}s)\n")
            self.stream.flush()
