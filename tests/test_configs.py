"""Every model, attention and data config composes (Hydra's compose API), and bad input is refused."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from cbam import PRESETS
from engine.config import as_dict, register_configs, to_object
from models import ARCHS

pytestmark = pytest.mark.any_torch  # Hydra's composition and the registries: no torch version in it

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
register_configs()


def options(group: str) -> list[str]:
    """A group's options as Hydra finds them: YAML files and ConfigStore entries."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def compose_train(*overrides: str) -> dict:
    """The plain dict of the typed config that train.py builds (as checkpoints and results.json hold it)."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    return as_dict(to_object(cfg))


def test_groups_are_the_registries():
    """The model and attention options are generated from the registries; the data options are files."""
    assert options("model") == sorted(ARCHS)
    assert options("attention") == sorted(PRESETS)
    assert not list((CONFIGS / "model").glob("*.yaml")) and not list((CONFIGS / "attention").glob("*.yaml"))
    assert options("data") == sorted(["cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic"])


def test_a_backbone_option_is_the_backbone_with_its_own_defaults():
    """model=wrn18_2 is WRN-18-2 (Table 4), not ResNet-18: its width comes from the backbone."""
    from analysis.profile import count_params
    from engine.config import from_dict
    from engine.network import build_model

    params = {}
    for arch in ("resnet18", "wrn18_2", "mobilenet_v1"):
        config = compose_train(f"model={arch}", "attention=none", "data=synthetic")
        params[arch] = count_params(build_model(from_dict(config)))
        assert params[arch] == count_params(factory_model(arch)), arch
    assert config["model"]["stride_in_1x1"] is None  # MobileNet takes no ResNet options
    assert compose_train("model=resnet50")["model"]["stride_in_1x1"] is False  # v1.5, as torchvision
    assert params["wrn18_2"] > 3 * params["resnet18"]


def factory_model(arch: str):
    from models import create_model

    return create_model(arch, 10, "none", stem="cifar")


def test_every_option_composes_and_writes_only_its_own_group():
    """Each model, attention and data file composes, and changes nothing outside its own package (the
    run's ``name`` interpolates all three), so any model x attention x data combination composes: the
    550 combinations themselves took two minutes to compose."""
    group_options = {group: options(group) for group in ("model", "attention", "data")}
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        default = OmegaConf.to_container(compose("train"))
        selected = {
            "model": lambda c: c.model.arch.value,
            "attention": lambda c: c.attention.name,
            "data": lambda c: c.data.name.value,
        }
        for group, selected_name in selected.items():
            for option in group_options[group]:
                cfg = compose("train", overrides=[f"{group}={option}"])
                assert selected_name(cfg) == option
                outside = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != group}
                assert outside == {k: v for k, v in default.items() if k != group}, f"{group}={option} writes outside"
        cfg = compose("train", overrides=["model=resnext50_32x4d", "attention=cbam_parallel", "data=imagenet"])
        assert cfg.name == "resnext50_32x4d_cbam_parallel_imagenet"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_attention_options_equal_the_presets(preset):
    """An attention option and the library preset of the same name describe the same module."""
    from cbam import resolve_spec

    assert resolve_spec(compose_train(f"attention={preset}")["attention"]) == PRESETS[preset]


def test_defaults_are_resnet18_cbam_cifar10_with_the_papers_recipe():
    cfg = compose_train()
    assert cfg["model"]["arch"] == "resnet18" and cfg["attention"]["name"] == "cbam"
    assert cfg["data"]["name"] == "cifar10"
    assert cfg["optim"] == {**cfg["optim"], "name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    assert cfg["sched"]["name"] == "step" and cfg["sched"]["decay_epochs"] == 30 and cfg["sched"]["decay_rate"] == 0.1


def test_quickstart_recipe():
    cfg = compose_train("experiment=quickstart")
    assert (cfg["model"]["arch"], cfg["model"]["stem"], cfg["model"]["width"]) == ("resnet18", "cifar", 0.25)
    assert cfg["attention"]["name"] == "cbam" and cfg["data"]["name"] == "fashion_mnist"


def test_sweepable_attention_fields():
    cfg = compose_train(
        "attention=cbam", "attention.kernel_size=3", "attention.order=parallel", "attention.reduction=8"
    )
    assert (cfg["attention"]["kernel_size"], cfg["attention"]["order"], cfg["attention"]["reduction"]) == (
        3,
        "parallel",
        8,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("attention.pool=median", "Invalid value 'median'"),
        ("trainer.epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model=resnet51", "Could not find 'model/resnet51'"),
        ("data.name=mnist", "Invalid value 'mnist'"),
        ("attention.kernel_size=3.5", "could not be converted to Integer"),
    ],
)
def test_bad_values_fail_at_compose_time(override, message):
    with pytest.raises(Exception) as info:
        compose_train(override)
    chain = f"{info.value} {info.value.__cause__}"  # Hydra's message and OmegaConf's detail
    assert message in chain


def test_resolved_config_is_plain():
    cfg = compose_train("experiment=quickstart")
    assert OmegaConf.create(cfg)  # plain types only: enums became strings
    assert cfg["model"]["stem"] == "cifar" and isinstance(cfg["attention"]["order"], str)


@pytest.mark.parametrize("group", ["attention", "data", "model", "optim", "sched"])
def test_schemas_are_not_options_of_their_group(group):
    """attention=base_attention once trained silently as an attention named "custom"."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/base_{group}'"):
        compose_train(f"{group}=base_{group}")


def test_help_lists_only_real_options():
    from helpers import run

    groups = {
        line.split(":")[0]: line.split(": ")[1].split(", ")
        for line in run("train.py", "--help").stdout.splitlines()
        if ": " in line and "," in line
    }
    assert groups["attention"] == sorted(PRESETS) and groups["model"] == sorted(ARCHS)
    assert not any(option.startswith("base_") for options in groups.values() for option in options)


def test_a_new_preset_backbone_data_set_and_logger_each_need_one_registry_entry(tmp_path, monkeypatch):
    """Registered from outside the project's modules (as a plug-in would), each is usable at once:
    the preset by create_model, the backbone and the data set by the config schema's choices, the
    logger by the trainer."""
    import dataclasses

    from cbam import build_attention, spec
    from engine import data, loggers
    from models import factory

    gate = dataclasses.replace(PRESETS["cbam"], name="test_gate", kernel_size=5)
    monkeypatch.setitem(spec.PRESETS, "test_gate", gate)
    assert build_attention(32, "test_gate").spatial_gate.conv.kernel_size == (5, 5)
    monkeypatch.setitem(factory._ARCHS, "resnet10_test", factory._ARCHS["resnet18"])
    assert factory.create_model("resnet10_test", 10, "test_gate", width=0.25) is not None
    monkeypatch.setitem(data.IN_MEMORY, "test_set", data.IN_MEMORY["synthetic"])

    written = []

    @loggers.register("test_logger")
    class ListLogger(loggers.Logger):
        def scalar(self, tag, value, step):
            written.append((tag, step))

        def image(self, tag, image, step):
            written.append((tag, step))

        def histogram(self, tag, values, step):
            written.append((tag, step))

        def hparams(self, hparams, metrics, varying):
            written.append(("hparams", metrics["val/top1"]))

    try:
        from engine.config import AttentionConfig
        from engine.trainer import Trainer
        from helpers import compose

        config = compose(
            "experiment=smoke",
            "model.width=0.25",
            "trainer.epochs=1",
            "trainer.image_every=1",
            "trainer.limit_train_batches=2",
        )
        config.data.name, config.logger.name = "test_set", "test_logger"
        config.model.arch, config.attention = "resnet10_test", AttentionConfig(**dataclasses.asdict(gate))
        results = Trainer(config, tmp_path).fit()
    finally:
        loggers.LOGGERS.pop("test_logger")
    assert ("val/top1", 1) in written and ("hparams", results["top1"]) in written
    assert any(tag.startswith("val_attention/spatial") for tag, _ in written)


def test_run_overrides_keep_what_changes_the_training():
    from engine.config import run_overrides

    given = [
        "experiment=smoke",
        "attention=cbam",
        "+model.drop_rate=0.1",
        "hydra.run.dir=/x",
        "data.root=/d",
        "paths.log_dir=/l",
        "optim.lr=0.05",
        "name=foo",
        "resume=auto",
        "model=resnet50",
    ]
    assert run_overrides(given) == [
        ("attention", "attention.name", "cbam"),
        ("model.drop_rate", "model.drop_rate", "0.1"),
        ("optim.lr", "optim.lr", "0.05"),
        ("model", "model.arch", "resnet50"),
    ]


def test_a_sweep_job_is_named_by_what_the_sweep_varies(monkeypatch):
    from engine.config import SWEPT_KEYS_ENV, SweptKeys, run_name

    def start_multirun(task, sweeper_params=None):  # what Hydra hands the callback in the launching process
        config = OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": {"params": sweeper_params}}})
        SweptKeys().on_multirun_start(config)

    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    start_multirun(["experiment=smoke", "attention=none,cbam", "model.width=0.25", "seed=range(3)"])
    assert os.environ[SWEPT_KEYS_ENV] == "attention,seed"
    task = ["experiment=smoke", "attention=cbam", "model.width=0.25", "seed=1"]
    assert run_name(task, 3) == "attention=cbam,seed=1"
    # hydra.sweeper.params of an experiment file count as swept too; '/' would open a sub-folder
    start_multirun(["experiment=smoke", "attention=none,cbam", "seed=1,2"], {"model": "a/b,c"})
    assert run_name([*task, "model=a/b"], 3) == "attention=cbam,seed=1,model=a_b"
    monkeypatch.setenv(SWEPT_KEYS_ENV, "")
    assert run_name(task, 3) == "attention=cbam,model.width=0.25,seed=1"  # unknown: every override
    assert run_name(["experiment=smoke"], 3) == "3"


def test_run_hparams_key_fields_first_then_the_overridden_ones():
    from engine.tblog import KEY_FIELDS, run_hparams

    config = compose_train("experiment=smoke", "model.zero_init_residual=true", "attention=se")
    hparams, varying = run_hparams(config, ["experiment=smoke", "model.zero_init_residual=true", "attention=se"])
    assert list(hparams) == [*KEY_FIELDS.values(), "model.zero_init_residual"]
    assert hparams["attention"] == "se" and hparams["epochs"] == "2" and isinstance(hparams["lr"], float)
    assert hparams["model.zero_init_residual"] == "true"  # booleans as text, not 1.0000
    assert varying == {"attention", "model.zero_init_residual"}


@pytest.mark.parametrize(
    ("overrides", "size_differs"),
    [(["attention=cbam"], True), (["model.width=0.5"], True), (["data=cifar100"], True), (["optim.lr=0.2"], False)],
)
def test_the_model_size_is_an_hparam_that_differs_where_the_overrides_change_it(overrides, size_differs):
    """params_M and GMACs follow the key fields as hparams; the HParams tab shows them first where the
    overrides change the model, its attention or its data (classes, channels), not where they set the lr."""
    from engine.loggers import Logger
    from engine.tblog import write_hparams

    class Recorder(Logger):
        def __init__(self):
            self.written = None

        def hparams(self, hparams, metrics, varying):
            self.written = hparams, metrics, varying

    recorder = Recorder()
    size = {"params_M": 0.7, "GMACs": 0.03}
    write_hparams(recorder, compose_train("experiment=smoke", *overrides), {"val/top1": 50.0}, overrides, size)
    hparams, metrics, varying = recorder.written
    assert list(hparams)[-2:] == ["params_M", "GMACs"] and hparams["GMACs"] == 0.03
    assert metrics == {"val/top1": 50.0}
    assert ({"params_M", "GMACs"} <= varying) is size_differs and varying - {"params_M", "GMACs"}


def test_a_checkpoints_plain_config_reads_back_from_any_version():
    """``from_dict`` of today's dict is the same config; an earlier version's dict, without today's options
    and with one that no longer exists, reads back with the values that run had."""
    from engine.checkpoint import check_same_architecture
    from engine.config import from_dict

    today = compose_train("experiment=quickstart", "attention=se")
    assert as_dict(from_dict(today)) == today
    earlier = {group: dict(values) if isinstance(values, dict) else values for group, values in today.items()}
    del earlier["trainer"]["tf32"], earlier["data"]["format"], earlier["model"]["blurpool"]
    del earlier["attention"]["module"]
    earlier["trainer"]["an_option_since_removed"] = 1
    config = from_dict(earlier)
    # and a run resumed from that version's checkpoint has the same network
    check_same_architecture(earlier, today, "last.pt")
    assert config.trainer.tf32 is False  # before the option, runs had no TF32
    assert config.data.format == "folder" and config.model.blurpool is False
    assert not hasattr(config.trainer, "an_option_since_removed")
    assert config.attention.spec() == PRESETS["se"] and config.model.width == 0.25


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("trainer.batch_size=0", "trainer.batch_size must be >= 1, got 0"),
        ("trainer.label_smoothing=1", r"trainer.label_smoothing must be in \[0, 1\), got 1.0"),
        ("data.mean=[0.5]", r"data.mean and data.std need one value per channel \(data.in_chans=3\)"),
        ("data.progressive_from=16", "progressive resizing is for image sets"),
        ("attention.kernel_size=4", "attention.kernel_size must be a positive odd integer"),
        ("model.width=-1", "model.width must be > 0"),
        (
            "trainer.compile_backend=aot_eager trainer.compile_mode=reduce-overhead",
            "trainer.compile_mode=reduce-overhead is inductor's; with trainer.compile_backend=aot_eager use",
        ),
    ],
)
def test_values_out_of_range_are_refused_when_the_config_is_built(override, message):
    from cbam.errors import UserError

    with pytest.raises(UserError, match=message):
        compose_train("experiment=smoke", *override.split())
