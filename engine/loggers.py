"""Where a run's metrics go: a small interface (scalars, images, histograms, hparams, charts, flush, close) and a
registry of implementations by name (``logger.name`` in the config). TensorBoard is the default;
another logger is one class registered here with ``@register("name")`` and one YAML in
``configs/logger/``.
"""

from __future__ import annotations

import re
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

    def hparams(self, hparams: dict[str, int | float | str], metrics: dict[str, float], varying: set[str]) -> None:
        """``hparams`` in the order to show them; ``metrics`` keyed by scalar tags already logged;
        ``varying``: the hparams that this run's overrides set (what differs between a sweep's runs)."""
        raise NotImplementedError

    def charts(self, charts: dict[str, list[str]]) -> None:
        """Charts to show first, each drawing several scalar series together: title -> scalar tags.
        Optional: a logger without such a view ignores it."""

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
        finite = values[torch.isfinite(values)]  # a diverged model's NaNs would leave TensorBoard no bins
        if finite.numel():
            self.writer.add_histogram(tag, finite, step)

    def hparams(self, hparams, metrics, varying):
        """The HParams plugin's experiment, session start and end, written into the run's own event file
        (``SummaryWriter.add_hparams`` would open a sub-run folder and add one-dot ``hparam/*`` charts).
        The metrics are the run's own scalar series (the plugin reads their last values). TensorBoard
        lists the hparams marked as differing first, each part by name, and shows five by default."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        def summary(tag: str, **data) -> Summary:
            content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
            return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])

        start = plugin_data_pb2.SessionStartInfo()
        infos = []
        for name, value in hparams.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number:
                start.hparams[name].number_value = value
            else:
                start.hparams[name].string_value = str(value)
            kind = api_pb2.DATA_TYPE_FLOAT64 if number else api_pb2.DATA_TYPE_STRING
            infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in varying))
        experiment = api_pb2.Experiment(
            hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics]
        )
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        for s in (
            summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            summary(metadata.SESSION_END_INFO_TAG, session_end_info=end),
        ):
            self.writer.file_writer.add_summary(s)

    def charts(self, charts):
        """The Custom Scalars tab: the scalars tab sorts its sections by name and offers no other order."""
        multiline = {title: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]] for title, tags in charts.items()}
        self.writer.add_custom_scalars({"run": multiline})

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def build_logger(name: str, run_dir: Path) -> Logger:
    """The logger registered as ``name``, writing for the run in ``run_dir``."""
    if name not in LOGGERS:
        raise UserError(f"logger.name={name!r} is not a registered logger; known: {', '.join(LOGGERS)}")
    return LOGGERS[name](run_dir)
