"""Progress of a run: one line for the whole run (every unit of every trial, with an ETA) above
one line for the unit being trained (its steps and latest validation numbers)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from tqdm.auto import tqdm


class Progress:
    """Both bars; with ``enabled=False`` every method is a no-op."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._run: Optional[tqdm] = None

    def start(self, total_steps: int, done_steps: int = 0, desc: str = "run") -> None:
        """The whole run: ``total_steps`` training steps over all units, ``done_steps`` of them
        already done (a resumed run)."""
        if self.enabled:
            self._run = tqdm(total=total_steps, initial=done_steps, desc=desc, unit="step",
                             position=0, dynamic_ncols=True, mininterval=1.0)

    def say(self, text: str) -> None:
        """A line above the bars (nothing when disabled or empty)."""
        if self.enabled and text:
            tqdm.write(text)

    @contextlib.contextmanager
    def unit(self, label: str, total: int, initial: int = 0) -> Iterator["UnitBar"]:
        bar = tqdm(total=total, initial=initial, desc=label, unit="step", leave=False,
                   position=1 if self._run else 0, dynamic_ncols=True, mininterval=1.0,
                   disable=not self.enabled)
        try:
            yield UnitBar(bar, self._run)
        finally:
            bar.close()

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None


class UnitBar:
    def __init__(self, bar: tqdm, run: Optional[tqdm]):
        self._bar, self._run = bar, run

    def advance(self, steps: int, run_steps: Optional[int] = None) -> None:
        """``steps`` more steps of this unit (``run_steps`` for the run bar, e.g. × trials)."""
        self._bar.update(steps)
        if self._run is not None:
            self._run.update(steps if run_steps is None else run_steps)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)
