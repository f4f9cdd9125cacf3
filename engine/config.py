"""Structured-config schemas for ``train.py`` / ``eval.py``, registered in Hydra's ConfigStore.

Each YAML file in ``configs/<group>/`` is validated against its group's dataclass when the config is
composed, so a wrong type or an unknown choice fails before any work with Hydra's own message.
Choice fields are enums; ``to_container`` turns them back into plain strings.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

from cbam.spec import CHOICES, AttentionSpec
from models import ARCHS

from .data import DATASETS, DECODE_CHOICES, FORMATS
from .device import AMP_CHOICES, COMPILE_MODES


class _Choice(enum.Enum):
    """A config choice; its string is its value, so that interpolations such as the run's
    ``name: ${model.arch}_...`` read ``resnet50``, not ``Arch.resnet50``."""

    def __str__(self) -> str:
        return str(self.value)


def _enum(name: str, values) -> type[enum.Enum]:
    return _Choice(name, {v: v for v in values})


def _attention_schema() -> type:
    """``AttentionSpec``'s fields as a mutable dataclass, choice fields as enums: one source of truth."""
    hints = typing.get_type_hints(AttentionSpec)
    fields = []
    for f in dataclasses.fields(AttentionSpec):
        kind = (
            _enum(f"{f.name.title().replace('_', '')}Choice", CHOICES[f.name]) if f.name in CHOICES else hints[f.name]
        )
        fields.append((f.name, kind, field(default=kind[f.default] if f.name in CHOICES else f.default)))
    return dataclasses.make_dataclass("AttentionConfig", fields)


AttentionConfig = _attention_schema()

Arch = _enum("Arch", ARCHS)  # the backbones' registry (models/factory.py)
Stem = _enum("Stem", ["auto", "imagenet", "cifar"])
Dataset = _enum("Dataset", DATASETS)  # the data sets' registry (engine/data/__init__.py)
DataFormat = _enum("DataFormat", FORMATS)
Decode = _enum("Decode", DECODE_CHOICES)
Optimizer = _enum("Optimizer", ["sgd", "adamw"])
Schedule = _enum("Schedule", ["step", "cosine", "linear", "constant"])
Amp = _enum("Amp", AMP_CHOICES)
CompileMode = _enum("CompileMode", COMPILE_MODES)


@dataclass
class ModelConfig:
    arch: Arch = Arch.resnet18
    stem: Stem = Stem.auto  # auto: the CIFAR stem for images up to 64 px, the ImageNet stem above
    width: float = 1.0
    # ResNet options; None leaves the backbone's default (MobileNet takes none of them).
    stride_in_1x1: Optional[bool] = None
    zero_init_residual: Optional[bool] = None
    drop_rate: float = 0.0
    pretrained: Optional[str] = None  # torchvision | timm | path to a checkpoint (models/pretrained.py)
    blurpool: bool = False  # a blur before each strided conv (models/blurpool.py; FFCV's recipe)


@dataclass
class DataConfig:
    name: Dataset = MISSING
    root: str = "data"
    num_classes: int = MISSING
    in_chans: int = 3
    image_size: int = 32  # training crop (the last one with progressive training)
    # Image sets: how they are stored, evaluated, and the training resolution of each epoch.
    format: DataFormat = DataFormat.folder  # folder (train/<class>/*.JPEG) | shards (scripts/prepare_data.py)
    decode: Decode = Decode.auto  # where JPEGs are decoded: cpu (workers) | device (nvJPEG on CUDA) | auto (measured)
    eval_size: int = 0  # evaluation crop; 0 = image_size
    resize_size: int = 0  # evaluation resize of the short side before the centre crop; 0 = eval_size * 8/7
    progressive_from: int = 0  # training crop of the first epochs (FFCV's low-res start); 0 = image_size throughout
    progressive_epochs: list[int] = field(default_factory=lambda: [0, 0])  # crop grows from .._from to image_size
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    augment: bool = True  # in-memory sets: random crop after zero padding + horizontal flip
    crop_padding: int = 4
    download: bool = True  # fetch with torchvision when the files are missing and a network is there
    verify: bool = True  # CIFAR: check the files against torchvision's MD5 sums (false: files made by hand)
    workers: int = 4  # processes that decode image sets (0: the main process); in-memory sets need none
    train_size: int = 0  # synthetic only: number of images
    val_size: int = 0


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.sgd
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    weight_decay_norm_bias: bool = True  # false: no weight decay on norm layers and biases (timm's param groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedConfig:
    name: Schedule = Schedule.step
    decay_epochs: int = 30  # step: multiply lr by decay_rate every decay_epochs
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from warmup_lr
    warmup_lr: float = 1e-5
    min_lr: float = 0.0  # cosine and linear: the lr at the last epoch's end
    per_step: bool = False  # update the lr every step (short runs) instead of every epoch


@dataclass
class TrainerConfig:
    epochs: int = 90
    batch_size: int = 256
    eval_batch_size: int = 0  # 0: same as batch_size
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Amp = Amp.auto  # auto: bf16 on CUDA, none (float32) on the CPU
    tf32: bool = True  # TF32 tensor cores for float32 matmuls and convs on CUDA
    channels_last: bool = True
    compile: Optional[bool] = None  # torch.compile the model; null: where it measured faster (engine/device.py)
    compile_mode: CompileMode = CompileMode.auto  # torch.compile's mode; auto: the device's measured one
    label_smoothing: float = 0.0
    max_nonfinite_steps: int = (
        10  # steps in a row whose update was skipped (loss or gradients not finite) before the run stops
    )
    eval_flip: bool = False  # evaluation: the mean of the logits of each image and its mirror image (FFCV's TTA)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    log_every: int = 50  # steps between plain log lines (when stdout is not a terminal)
    image_every: int = 5  # epochs between attention-map images in TensorBoard; 0 = off
    limit_train_batches: int = 0  # smoke tests: stop each epoch after this many batches; 0 = all
    limit_val_batches: int = 0
    ckpt_every_steps: int = 0  # also checkpoint every N steps; 0 = only at epoch ends
    deterministic: bool = False
    sync_bn: bool = False
    stop_grace_s: float = 10.0  # after SIGTERM/SIGINT: seconds to finish the step before the work is interrupted


@dataclass
class LoggerConfig:
    name: str = "tensorboard"  # a name registered in engine/loggers.py


@dataclass
class PathsConfig:
    log_dir: str = "runs"
    output_dir: Optional[str] = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    attention: Any = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    name: str = "train"
    seed: int = 0
    resume: Optional[str] = None  # null | auto | path to a checkpoint


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    output: Optional[str] = None  # JSON path; default: eval_<checkpoint name>.json beside it
    batch_size: int = 0  # 0: the training run's eval batch size
    device: str = "auto"
    data_root: Optional[str] = None  # where the data is now, if it moved since training
    limit_val_batches: int = 0


def register_configs(app: str = "train") -> None:
    """Register the schemas of ``app`` (train | eval); YAML files name them in their defaults list
    (``base_train``, ``base_eval``, ``/schema/<group>@_here_``)."""
    cs = ConfigStore.instance()
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)  # hydra.sweep.subdir
    if app == "eval":
        cs.store(name="base_eval", node=EvalConfig)
        return
    cs.store(name="base_train", node=TrainConfig)
    # Outside the groups they validate (schema/<group>, named in each YAML's defaults list), so that the
    # groups offer only real options.
    for group, node in [
        ("model", ModelConfig),
        ("attention", AttentionConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("sched", SchedConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group="schema", name=group, node=node)


# A group override names the option of a group; its config field is the option's name.
GROUP_FIELDS = {
    "model": "model.arch",
    "attention": "attention.name",
    "data": "data.name",
    "optim": "optim.name",
    "sched": "sched.name",
    "logger": "logger.name",
}
# Overrides that say where things are or how the sweep is run, not what is trained.
NOT_RUN_FIELDS = ("hydra", "experiment", "data.root", "paths", "resume", "name")


def run_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(override key, config field, value) of each command-line or sweep override that changes what is
    trained, in the given order: ``attention=cbam`` -> ``("attention", "attention.name", "cbam")``."""
    found = []
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or any(key == k or key.startswith((k + ".", k + "/")) for k in NOT_RUN_FIELDS):
            continue
        found.append((key, GROUP_FIELDS.get(key, key), value))
    return found


SWEPT_KEYS_ENV = "CBAM_SWEPT_KEYS"  # the sweep's swept keys, set by SweptKeys for its jobs


class SweptKeys(Callback):
    """At the start of a multirun, in the process that launches the jobs: the keys that the sweep
    varies (``attention=none,cbam`` on the command line, ``hydra.sweeper.params``) go into the
    environment, which every job inherits whatever the launcher (local, or submitit's processes on other
    hosts), so that ``swept_overrides`` can tell them from the overrides that all jobs share."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.to_container(config.hydra.overrides.task)
        swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
        swept += list(config.hydra.sweeper.get("params") or {})
        os.environ[SWEPT_KEYS_ENV] = ",".join(dict.fromkeys(swept))


def swept_overrides(overrides: list[str]) -> list[str]:
    """A sweep job's overrides that differ between the sweep's jobs (``attention=cbam``, ``seed=1``: the keys
    that ``SweptKeys`` found), in the given order; all those that change what is trained
    (``run_overrides``) when the swept keys are unknown."""
    swept = set(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    return [f"{key}={value}" for key, _, value in run_overrides(list(overrides)) if key in swept or not swept]


def run_name(overrides: list[str], job_num: int) -> str:
    """A sweep job's folder name: its ``swept_overrides`` joined by commas (``attention=cbam,seed=1``), ``/``
    replaced by ``_`` so that it stays one folder; the job number when there is none."""
    name = ",".join(swept_overrides(overrides)).replace("/", "_")
    return name[:200] if name else str(job_num)


def to_container(cfg: DictConfig) -> dict:
    """A resolved plain dict with enums as strings (for logging, checkpoints and ``create_model``)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
