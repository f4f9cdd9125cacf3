"""The run's config: one typed object whose dataclasses are Hydra's structured-config schemas.

Hydra checks each field's type and each choice (an enum) when the config is composed; ``to_object``
then builds the dataclasses, whose ``__post_init__`` checks the ranges no type can express and turns
choices back into plain strings. The engine reads attributes (``config.trainer.batch_size``).
Checkpoints and results files hold the plain dict of ``as_dict``; ``from_dict`` reads it back, from
checkpoints of any earlier version too. The ``model`` and ``attention`` groups are generated from their
registries (``models.ARCHS``, ``cbam.spec.PRESETS``): a new backbone or preset is one entry there.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cbam.errors import UserError
from cbam.spec import CHOICES, PRESETS, AttentionSpec
from models import ARCHS, backbone_options

from .data import DATASETS, DECODE_CHOICES, FORMATS, IMAGE_SETS
from .data.randaugment import check_config as check_randaugment
from .device import AMP_CHOICES, COMPILE_BACKENDS, COMPILE_MODES


class ConfigError(UserError):
    """A config value out of its range; the message names the field, the value and what is allowed."""


class _Choice(str, enum.Enum):
    """A config choice; its string is its value, so that interpolations such as the run's
    ``name: ${model.arch}_...`` read ``resnet50``, not ``Arch.resnet50``."""

    def __str__(self) -> str:
        return str(self.value)


def _enum(name: str, values) -> type[enum.Enum]:
    return _Choice(name, {v: v for v in values})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class _Checked:
    """A schema that checks itself when built (``to_object``, or by hand): choices become plain strings,
    then ``check`` refuses values out of range."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                setattr(self, f.name, value.value)
        self.check()

    def check(self) -> None:
        pass


def _attention_schema() -> type:
    """``AttentionSpec``'s fields as a mutable dataclass, choice fields as enums: one source of truth. Built,
    it checks itself as an ``AttentionSpec`` would (``spec()``)."""
    hints = typing.get_type_hints(AttentionSpec)
    fields = []
    for f in dataclasses.fields(AttentionSpec):
        kind = (
            _enum(f"{f.name.title().replace('_', '')}Choice", CHOICES[f.name]) if f.name in CHOICES else hints[f.name]
        )
        fields.append((f.name, kind, field(default=kind[f.default] if f.name in CHOICES else f.default)))

    def spec(self) -> AttentionSpec:
        return AttentionSpec(**dataclasses.asdict(self))

    return dataclasses.make_dataclass(
        "AttentionConfig", fields, bases=(_Checked,), namespace={"spec": spec, "check": lambda self: self.spec()}
    )


AttentionConfig = _attention_schema()

Arch = _enum("Arch", ARCHS)  # the backbones' registry (models/factory.py)
Stem = _enum("Stem", ["auto", "imagenet", "cifar"])
Dataset = _enum("Dataset", DATASETS)  # the data sets' registry (engine/data/__init__.py)
DataFormat = _enum("DataFormat", FORMATS)
Decode = _enum("Decode", DECODE_CHOICES)
Optimizer = _enum("Optimizer", ["sgd", "adamw", "lamb"])
Schedule = _enum("Schedule", ["step", "cosine", "linear", "constant"])
Amp = _enum("Amp", AMP_CHOICES)
Loss = _enum("Loss", ["ce", "bce"])
CompileMode = _enum("CompileMode", COMPILE_MODES)
CompileBackend = _enum("CompileBackend", COMPILE_BACKENDS)


# A ``model`` option's values that come from its backbone: its own width (WRN-18-2's 2.0) and the options
# that not every backbone takes.
BACKBONE_OPTIONS = ("width", "stride_in_1x1", "zero_init_residual")


@dataclass
class ModelConfig(_Checked):
    arch: Arch = Arch.resnet18
    stem: Stem = Stem.auto  # auto: the CIFAR stem for images up to 64 px, the ImageNet stem above
    width: float = 1.0  # multiplies every stage's channels; model=<arch> sets the backbone's own (wrn18_2: 2.0)
    # ResNet options; None leaves the backbone's default (MobileNet takes none of them).
    stride_in_1x1: Optional[bool] = None
    zero_init_residual: Optional[bool] = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, growing linearly to this in the last block (ResNets)
    pretrained: Optional[str] = None  # torchvision | timm | path to a checkpoint (models/pretrained.py)
    blurpool: bool = False  # a blur before each strided conv (models/blurpool.py; FFCV's recipe)

    def check(self) -> None:
        _require(self.width > 0, f"model.width must be > 0, got {self.width}")
        _require(0 <= self.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def stem_for(self, image_size: int) -> str:
        """The stem the network gets: ``auto`` is the CIFAR stem for images up to 64 px."""
        if self.stem != "auto":
            return self.stem
        return "cifar" if image_size <= 64 else "imagenet"


@dataclass
class DataConfig(_Checked):
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
    randaugment: str = ""  # timm's RandAugment string (rand-m6-mstd0.5-inc1), on the device after the crop; "" = off
    crop_padding: int = 4
    download: bool = True  # fetch with torchvision when the files are missing and a network is there
    verify: bool = True  # CIFAR: check the files against torchvision's MD5 sums (false: files made by hand)
    workers: int = 4  # processes that decode image sets (0: the main process); in-memory sets need none
    train_size: int = 0  # synthetic only: number of images
    val_size: int = 0

    def check(self) -> None:
        _require(self.num_classes >= 1, f"data.num_classes must be >= 1, got {self.num_classes}")
        _require(
            len(self.mean) == self.in_chans and len(self.std) == self.in_chans,
            f"data.mean and data.std need one value per channel (data.in_chans={self.in_chans})",
        )
        _require(
            self.name != "synthetic" or (self.train_size >= 1 and self.val_size >= 1),
            "data.train_size and data.val_size must be >= 1 for the synthetic set",
        )
        _require(self.workers >= 0, f"data.workers must be >= 0 (0: decode in the main process), got {self.workers}")
        _require(
            min(self.eval_size, self.resize_size) >= 0, "data.eval_size and data.resize_size must be >= 0 (0: default)"
        )
        problem = self.randaugment and check_randaugment(self.randaugment)
        _require(
            not problem,
            f"data.randaugment={self.randaugment!r}: {problem}. Allowed: timm's RandAugment strings, such as "
            "rand-m9-mstd0.5 or rand-m6-mstd0.5-inc1 (m magnitude 0-10, n ops, mstd magnitude noise, inc1 increasing "
            "ops, p probability), or '' for none",
        )
        first_last = self.progressive_epochs
        _require(
            len(first_last) == 2 and 0 <= first_last[0] <= first_last[1],
            f"data.progressive_epochs must be [first, last] epochs, 0 <= first <= last, got {list(first_last)}",
        )
        _require(
            not self.progressive_from or self.name in IMAGE_SETS,
            f"data.progressive_from: progressive resizing is for image sets ({', '.join(IMAGE_SETS)}), not {self.name}",
        )
        _require(
            0 <= self.progressive_from <= self.image_size,
            f"data.progressive_from must be in [0, data.image_size={self.image_size}], got {self.progressive_from}",
        )


@dataclass
class OptimConfig(_Checked):
    name: Optimizer = Optimizer.sgd
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    weight_decay_norm_bias: bool = True  # false: no weight decay on norm layers and biases (timm's param groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def check(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class SchedConfig(_Checked):
    name: Schedule = Schedule.step
    decay_epochs: int = 30  # step: multiply lr by decay_rate every decay_epochs
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from warmup_lr
    warmup_lr: float = 1e-5
    min_lr: float = 0.0  # cosine and linear: the lr at the last epoch's end
    per_step: bool = False  # update the lr every step (short runs) instead of every epoch


@dataclass
class TrainerConfig(_Checked):
    epochs: int = 90
    batch_size: int = 256
    eval_batch_size: int = 0  # 0: same as batch_size
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Amp = Amp.auto  # auto: bf16 on CUDA, none (float32) on the CPU
    tf32: bool = True  # TF32 tensor cores for float32 matmuls and convs on CUDA
    channels_last: bool = True
    compile: Optional[bool] = None  # torch.compile the model; null: where it measured faster (engine/device.py)
    compile_mode: CompileMode = CompileMode.auto  # torch.compile's mode; auto: the device's measured one
    compile_backend: CompileBackend = CompileBackend.inductor  # aot_eager | eager: capture without inductor
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Mixup's alpha (timm.data.Mixup, on the device); 0 = off
    cutmix: float = 0.0  # CutMix's alpha; with mixup too, each batch gets one of them (probability 1/2 each)
    loss: Loss = Loss.ce  # training loss: ce (cross-entropy) | bce (timm's BinaryCrossEntropy, ResNet strikes back)
    bce_target_threshold: float = 0.2  # loss=bce: soft targets above it count as 1 (RSB's 0.2)
    max_nonfinite_steps: int = 10  # steps in a row with a skipped update (not finite) before the run stops
    eval_flip: bool = False  # evaluation: the mean of the logits of each image and its mirror image (FFCV's TTA)
    ema_decay: float = 0.0  # an exponential moving average of the weights (timm's ModelEmaV3), also evaluated; 0 = off
    ema_warmup: bool = False  # the EMA's decay grows with the step (timm's warmup: 1 - (1 + step)^-2/3) up to ema_decay
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    log_every: int = 50  # steps between plain log lines (when stdout is not a terminal)
    image_every: int = 5  # epochs between attention-map images in TensorBoard; 0 = off
    limit_train_batches: int = 0  # smoke tests: stop each epoch after this many batches; 0 = all
    limit_val_batches: int = 0
    ckpt_every_steps: int = 0  # also checkpoint every N steps; 0 = only at epoch ends
    deterministic: bool = False
    sync_bn: bool = False
    stop_grace_s: float = 10.0  # after SIGTERM/SIGINT: seconds to finish the step before the work is interrupted

    def check(self) -> None:
        for name, low in [("batch_size", 1), ("epochs", 1), ("eval_batch_size", 0), ("log_every", 1)]:
            _require(getattr(self, name) >= low, f"trainer.{name} must be >= {low}, got {getattr(self, name)}")
        _require(
            self.max_nonfinite_steps >= 1, f"trainer.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}"
        )
        _require(
            0 <= self.label_smoothing < 1, f"trainer.label_smoothing must be in [0, 1), got {self.label_smoothing}"
        )
        _require(self.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _require(
            self.compile_backend == "inductor" or self.compile_mode in ("auto", "default"),
            f"trainer.compile_mode={self.compile_mode} is inductor's; with trainer.compile_backend="
            f"{self.compile_backend} use trainer.compile_mode=auto or default",
        )
        _require(self.stop_grace_s > 0, f"trainer.stop_grace_s must be > 0, got {self.stop_grace_s}")
        _require(0 <= self.ema_decay < 1, f"trainer.ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        for name in ("mixup", "cutmix"):
            _require(getattr(self, name) >= 0, f"trainer.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        _require(
            not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
            f"trainer.mixup and trainer.cutmix pair each image with another: trainer.batch_size must be even "
            f"(per process), got {self.batch_size}",
        )


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
    attention: AttentionConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    name: str = "train"
    recipe: str = "custom"  # the recipe group's choice (configs/recipe/: paper, modern, rsb_a3); custom: none
    seed: int = 0
    resume: Optional[str] = None  # null | auto | path to a checkpoint
    dry_run: bool = False  # compose and check the config, write the run folder's .hydra/, train nothing


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    ema: bool = False  # evaluate the EMA of the weights (a run trained with trainer.ema_decay > 0)
    output: Optional[str] = None  # JSON path; default: eval_<checkpoint name>.json beside it
    batch_size: int = 0  # 0: the training run's eval batch size
    device: str = "auto"
    data_root: Optional[str] = None  # where the data is now, if it moved since training
    limit_val_batches: int = 0


def register_configs(app: str = "train") -> None:
    """Register the schemas of ``app`` (train | eval), which YAML files name in their defaults list
    (``base_train``, ``base_eval``, ``/schema/<group>@_here_``), and the options of the ``model`` and
    ``attention`` groups: one per backbone of ``models.ARCHS`` and one per preset of ``cbam.spec.PRESETS``."""
    cs = ConfigStore.instance()
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)  # hydra.sweep.subdir
    # The recipes' epoch counts that scale with the run's length (configs/recipe/)
    OmegaConf.register_new_resolver("epochs_div", _epochs_div, replace=True)
    OmegaConf.register_new_resolver("epochs_mul", _epochs_mul, replace=True)
    if app == "eval":
        cs.store(name="base_eval", node=EvalConfig)
        return
    cs.store(name="base_train", node=TrainConfig)
    # Outside the groups they validate (schema/<group>, named in each YAML's defaults list), so that the
    # groups offer only real options.
    for group, node in [
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("sched", SchedConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group="schema", name=group, node=node)
    for arch in ARCHS:
        options = {k: v for k, v in backbone_options(arch).items() if k in BACKBONE_OPTIONS}
        cs.store(group="model", name=arch, node=ModelConfig(arch=arch, **options))
    for name, spec in PRESETS.items():
        cs.store(group="attention", name=name, node=AttentionConfig(**dataclasses.asdict(spec)))


def _epochs_div(parts: int, *, _root_: DictConfig) -> int:
    """``${epochs_div:3}``: a third of ``trainer.epochs``, rounded, at least 1 (the paper's step schedule)."""
    return max(1, round(_root_.trainer.epochs / parts))


def _epochs_mul(fraction: float, *, _root_: DictConfig) -> float:
    """``${epochs_mul:0.05}``: that fraction of ``trainer.epochs`` (a warmup of 5% of the run)."""
    return _root_.trainer.epochs * fraction


# A group override names the option of a group; its config field is the option's name.
GROUP_FIELDS = {
    "model": "model.arch",
    "attention": "attention.name",
    "data": "data.name",
    "optim": "optim.name",
    "sched": "sched.name",
    "logger": "logger.name",
    "recipe": "recipe",
}
# Overrides that say where things are or how the sweep is run, not what is trained.
NOT_RUN_FIELDS = ("hydra", "experiment", "data.root", "paths", "resume", "name", "dry_run")


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


def to_object(cfg: DictConfig) -> TrainConfig:
    """The composed config as the typed, checked ``TrainConfig`` (interpolations resolved)."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key
        raise ConfigError(f"{key} has no value (???). Fix: set it on the command line, {key}=...") from None


def as_dict(config: TrainConfig) -> dict:
    """The plain dict of a config, as checkpoints, results.json and TensorBoard's HParams hold it."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


# What checkpoints written before an option existed ran with, where that differs from today's default.
EARLIER_DEFAULTS = {("trainer", "tf32"): False}


def from_dict(config: dict) -> TrainConfig:
    """The ``TrainConfig`` of a checkpoint's plain dict, checked. Written by an earlier version, its missing
    options take the value the run had (``EARLIER_DEFAULTS``, else today's default), and options that no
    longer exist are dropped."""
    schema = TrainConfig(
        model=ModelConfig(),
        attention=AttentionConfig(),
        data=DataConfig(name="synthetic", num_classes=1, train_size=1, val_size=1),
        optim=OptimConfig(),
        sched=SchedConfig(),
        logger=LoggerConfig(),
    )
    known = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    known["paths"]["output_dir"] = None  # Hydra's, resolved when the run was composed
    for (group, key), value in EARLIER_DEFAULTS.items():
        known[group][key] = value
    merged = {
        name: {k: v for k, v in config[name].items() if k in default} if isinstance(default, dict) else config[name]
        for name, default in known.items()
        if name in config
    }
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), known, merged))
