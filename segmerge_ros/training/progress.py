"""A dependency-free progress bar on stderr, shared by every ``segmerge-train`` loop and the teacher labelling."""

from __future__ import annotations

import sys
import time


class Progress:
    """A dependency-free progress bar on stderr: redrawn in place on a terminal, a line every 5 % otherwise."""

    def __init__(self, total: int, label: str = "", stream=None, start: int = 0) -> None:
        self.total, self.label, self.start = max(total, 1), label, start
        self.stream = stream or sys.stderr
        self.began = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, self.total // 20)

    def update(self, done: int, **values: float) -> None:
        elapsed = time.perf_counter() - self.began
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        filled = int(30 * done / self.total)
        extras = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = (
            f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
            f"{rate:.2f} it/s eta {eta:.0f}s {extras}"
        )
        if self.tty:
            self.stream.write("\r" + line)
        elif done % self.every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
