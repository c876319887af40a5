"""Progress of a ``smoa bench`` run: tqdm's live bar on a terminal, a handful of lines in a log."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["progress_bar"]


class _LogProgress:
    """Progress for a log (CI, ``nohup``, a notebook's captured output): a line at each quarter of the work and at
    the end, instead of a terminal bar's hundreds of carriage-return updates on one line."""

    STEPS = 4

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.log, self.start = total, 0, log, time.monotonic()
        self.next_mark, self.postfix = 1, ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        while self.total and self.next_mark <= self.STEPS and self.done * self.STEPS >= self.next_mark * self.total:
            self.next_mark += 1
            elapsed = time.monotonic() - self.start
            where = f" ({self.postfix})" if self.postfix else ""
            self.log(f"smoa bench: {self.done}/{self.total} measurements, {elapsed:.0f} s{where}")

    def close(self) -> None:
        pass


def progress_bar(total: int, progress: bool, stream, log: Callable[[str], None]):
    """tqdm's live bar on a terminal; on anything else (a file, a pipe) a few log lines; nothing with ``progress``
    off."""
    from tqdm.auto import tqdm

    if progress and not (hasattr(stream, "isatty") and stream.isatty()):
        return _LogProgress(total, log)
    return tqdm(total=total, desc="smoa bench", unit="meas", file=stream, disable=not progress, dynamic_ncols=True)
