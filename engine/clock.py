"""Training time and throughput, and how long the rest of a run will take."""

from __future__ import annotations

import time


class Clock:
    """Seconds and images of training, over the whole run (``train_s``, ``images``: carried across resumes
    by the checkpoint) and since the last ``lap`` (the rate that logging steps print).

    A process's first ``warmup_steps`` steps (compilation, the allocator's first requests) are timed
    apart (``warmup_s``) and left out of the rate. Time between ``pause`` and ``resume`` (evaluation,
    checkpoints) counts in neither. Without synchronising with the device the host's clock runs ahead of
    the work it has queued, by at most the queue's depth; over the many steps between two logging
    steps, which read the device anyway, the difference is negligible.
    """

    def __init__(self, warmup_steps: int, train_s: float = 0.0, images: int = 0, warmup_s: float = 0.0):
        self.warmup_steps, self.train_s, self.images, self.warmup_s = warmup_steps, train_s, images, warmup_s
        self.steps = 0  # this process's
        self.lap_s, self.lap_images = 0.0, 0
        self.steady_s, self.steady_steps = 0.0, 0  # this process's steps after the warm-up
        self._tic: float | None = None

    def resume(self) -> None:
        self._tic = time.perf_counter()

    def pause(self) -> None:
        if self._tic is not None:
            self._account(time.perf_counter() - self._tic, 0)
            self._tic = None

    def step(self, images: int) -> None:
        """A step of ``images`` images has been queued."""
        now = time.perf_counter()
        seconds, self._tic = now - self._tic, now
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.warmup_s += seconds
        else:
            self._account(seconds, images)
            self.steady_s, self.steady_steps = self.steady_s + seconds, self.steady_steps + 1

    def _account(self, seconds: float, images: int) -> None:
        if self.steps <= self.warmup_steps:
            self.warmup_s += seconds
            return
        self.train_s += seconds
        self.images += images
        self.lap_s += seconds
        self.lap_images += images

    def lap(self) -> float:
        """Images/s since the last lap (0 while warming up), and a new lap starts."""
        rate = self.lap_images / self.lap_s if self.lap_s > 0 else 0.0
        self.lap_s, self.lap_images = 0.0, 0
        return rate

    @property
    def step_s(self) -> float:
        """Seconds per step of this process after its warm-up (0 until measured)."""
        return self.steady_s / self.steady_steps if self.steady_steps else 0.0

    @property
    def img_per_s(self) -> float:
        """The run's steady-state training images/s."""
        return self.images / self.train_s if self.train_s > 0 else 0.0

    def eta(self, steps_left: int, batch: int) -> float:
        """Seconds for ``steps_left`` more steps of ``batch`` images at the run's rate."""
        return steps_left * batch / self.img_per_s if self.img_per_s > 0 else float("nan")
