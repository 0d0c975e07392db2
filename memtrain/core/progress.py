"""Progress of long stages, so a slow run never looks like a hung one: a bar on the main process
(items done, ETA) that inner loops annotate (`note("attack step 12/50")`: the sampler's batches
and the attack's steps do), quiet under --no_progress, and one summary line with the wall time
when a stage ends.

    with progress.stage("audit: nemo: targets", total=10, unit="targets", enabled=True) as bar:
        for chunk in chunks:
            ...                      # attack / sampling loops call progress.note(...)
            bar.advance(len(chunk))

Only the innermost open stage shows notes; a stage opened while another is open nests under it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

from tqdm.auto import tqdm

logger = logging.getLogger("memtrain")

_ACTIVE: contextvars.ContextVar["Stage | None"] = contextvars.ContextVar("memtrain_stage", default=None)


@dataclass
class Stage:
    """An open stage: its bar (None when quiet), the items done and when it started."""

    name: str
    unit: str
    bar: tqdm | None
    started: float = field(default_factory=time.perf_counter)
    done: int = 0

    def advance(self, n: int = 1) -> None:
        """`n` more items done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def stage(name: str, total: int | None, unit: str = "items", enabled: bool = True) -> Iterator[Stage]:
    """A stage of `total` items (None: unknown); `enabled` False (--no_progress, or not the main
    process) shows and logs nothing."""
    bar = tqdm(total=total, desc=name, unit=f" {unit}", dynamic_ncols=True, leave=False) if enabled else None
    current = Stage(name, unit, bar)
    token = _ACTIVE.set(current)
    try:
        yield current
    finally:
        _ACTIVE.reset(token)
        if bar is not None:
            bar.close()
            logger.info("%s: %d %s in %.0f s", name, current.done, unit, current.seconds)


def note(text: str) -> None:
    """Show `text` beside the innermost open stage's bar (refreshing it); nothing without one."""
    current = _ACTIVE.get()
    if current is not None and current.bar is not None:
        current.bar.set_postfix_str(text, refresh=True)
