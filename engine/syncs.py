"""Counting the moments a training step makes the host wait for the device.

On CUDA, torch's sync debug mode reports every such moment (a copy to the host, a stream or device
synchronisation). On the CPU nothing waits, so what is counted there is the tensor calls that would
wait on CUDA (``SYNC_CALLS``): the same code, checked on any machine. ``count_step_syncs`` counts over
the training steps of a ``Trainer`` that do not log (the logging steps read the device by design).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

SYNC_CALLS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class SyncCounter:
    """A context in which ``counting()`` sections count synchronisations into ``calls`` (the names of
    the calls on the CPU; CUDA's warnings' first lines on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.calls: list[str] = []
        self._active, self._real = False, {}

    def __enter__(self) -> SyncCounter:
        if not self.cuda:
            for name in SYNC_CALLS:
                self._real[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._counted(name, self._real[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._real.items():
            setattr(torch.Tensor, name, real)
        self._real = {}

    def _counted(self, name: str, real):
        def call(tensor, *args, **kwargs):
            if self._active:
                self.calls.append(name)
            return real(tensor, *args, **kwargs)

        return call

    @contextlib.contextmanager
    def counting(self):
        if not self.cuda:
            self._active = True
            try:
                yield
            finally:
                self._active = False
            return
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(before)
        self.calls += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def count_step_syncs(trainer, counter: SyncCounter) -> dict:
    """Make ``trainer`` count its synchronisations in each training step and each batch's loading, the
    logging steps excepted; returns the tally that ``fit`` fills (``steps`` counted)."""
    tally = {"steps": 0}
    real_step, real_batches = trainer.train_step, trainer.train_batches.batches

    def step(x, y):
        logs = (trainer.global_step + 1) % trainer.t.log_every == 0 or trainer.next_batch + 1 == trainer.steps_per_epoch
        if logs:
            return real_step(x, y)
        tally["steps"] += 1
        with counter.counting():
            return real_step(x, y)

    def batches(*args, **kwargs):
        it = real_batches(*args, **kwargs)
        while True:
            with counter.counting():
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    trainer.train_step, trainer.train_batches.batches = step, batches
    return tally
