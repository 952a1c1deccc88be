"""Training progress: a redrawn bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows ``step/total`` and the loss while a run trains.

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

    def update(self, step: int, loss: float) -> None:
        """Report that ``step`` (1-based) finished with ``loss``."""
        if self.interactive:
            width = 30
            filled = width * step // self.total
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.label:<24} [{bar}] {step:>4}/{self.total} loss {loss:7.4f}")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step in (1, self.total):
            elapsed = time.perf_counter() - self.started
            self.stream.write(f"{self.label}: step {step}/{self.total} loss {loss:.4f} ({elapsed:.1f}s)\n")
            self.stream.flush()
