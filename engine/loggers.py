"""Where a run's metrics go: a small interface (scalars, images, histograms, hparams, flush, close) and a
registry of implementations by name (``logger.name`` in the config). TensorBoard is the default;
another logger is one class registered here with ``@register("name")`` and one YAML in
``configs/logger/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cbam.errors import UserError

LOGGERS: dict[str, Callable[[Path], Logger]] = {}


def register(name: str):
    """Class decorator: make a ``Logger`` subclass available as ``logger.name=<name>``."""

    def add(cls):
        LOGGERS[name] = cls
        return cls

    return add


class Logger:
    """What the trainer writes. ``hparams`` come once, at the end, with the final metrics."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        raise NotImplementedError

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3, H, W) or (1, H, W) floats in [0, 1]."""
        raise NotImplementedError

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        raise NotImplementedError

    def hparams(self, hparams: dict[str, int | float | str | bool], metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@register("tensorboard")
class TensorBoardLogger(Logger):
    """Event files in the run folder (``tensorboard --logdir runs``), hparams in the same file."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run_dir)
        self.writer = SummaryWriter(self.run_dir)

    def scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def image(self, tag, image, step):
        self.writer.add_image(tag, image, step)

    def histogram(self, tag, values, step):
        self.writer.add_histogram(tag, values, step)

    def hparams(self, hparams, metrics):
        """HParams plugin data written into the run's own event file: ``SummaryWriter.add_hparams`` would
        open a sub-run folder for every call."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metric_tags = {f"hparam/{k}": v for k, v in metrics.items()}
        for summary in hparams_summaries(hparams, metric_tags):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metric_tags.items():
            self.writer.add_scalar(tag, value)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def build_logger(name: str, run_dir: Path) -> Logger:
    """The logger registered as ``name``, writing for the run in ``run_dir``."""
    if name not in LOGGERS:
        raise UserError(f"logger.name={name!r} is not a registered logger; known: {', '.join(LOGGERS)}")
    return LOGGERS[name](run_dir)
