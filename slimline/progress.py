"""Progress display: a tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Progress:
    """``with Progress(total, desc) as bar: bar.update(1, loss=0.3)``.

    Off a TTY it prints a line at every 10% step (every step when there are few), so a log shows
    how far a long stage got without carriage-return noise.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True,
                 stream: IO[str] | None = None):
        self.total, self.desc, self.count = max(int(total), 1), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._bar = None
        self._next_report = 0
        self._start = time.perf_counter()
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        percent = 100 * self.count // self.total
        if percent >= self._next_report or self.count >= self.total:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in postfix.items())
            elapsed = time.perf_counter() - self._start
            print(f"  {self.desc} {self.count}/{self.total} ({percent}%) {extra} "
                  f"[{elapsed:.1f}s]".rstrip(), file=self.stream, flush=True)
            step = 10 if self.total > 10 else 100 // self.total
            self._next_report = (percent // step + 1) * step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
