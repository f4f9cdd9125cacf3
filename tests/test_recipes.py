"""Named recipes against the sources they reproduce."""

import dataclasses

import numpy as np
import pytest
import torch

from cbam import PRESETS
from engine.data import eval_geometry
from engine.data.geometry import train_resolution
from engine.network import build_model
from engine.optim import build_optimizer, build_scheduler
from helpers import compose


def ffcv_lr(epoch: float, lr: float, epochs: int, peak: int = 2) -> float:
    """ffcv-imagenet's train_imagenet.py, get_cyclic_lr, interpolated within epochs as its train loop does."""
    return float(np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0])


def ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """ffcv-imagenet's get_resolution."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("epochs, ramp", [(16, (11, 13)), (88, (65, 76))])
def test_imagenet_fast_is_ffcvs_resnet50_recipe(epochs, ramp):
    config = compose(f"experiment=imagenet_fast/{epochs}_epochs", "attention=cbam", "data.root=/data")
    d, t, o = config.data, config.trainer, config.optim
    assert config.model.arch == "resnet50" and config.attention.name == "cbam"
    assert (t.epochs, t.batch_size, t.label_smoothing, t.eval_flip) == (epochs, 8 * 512, 0.1, True)
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov) == ("sgd", 1.7, 0.9, 1e-4, False)
    assert d.format == "shards"
    for epoch in range(epochs):
        size = train_resolution(epoch, d.image_size, d.progressive_from, tuple(d.progressive_epochs))
        assert size == ffcv_resolution(epoch, 160, 192, ramp[1], ramp[0])
    assert eval_geometry(d) == (293, 256) and abs(224 / 256 - 256 / 293) < 0.002  # FFCV: 224/256 crop, at 256

    model = build_model(config, pretrained=False)
    optimizer = build_optimizer(model, o)
    steps = 10  # per epoch
    scheduler = build_scheduler(optimizer, config.sched, epochs, steps)
    for step in [0, 1, 5, 19, 20, 21, 100, epochs * steps // 2, epochs * steps - 1]:
        scheduler.step_update(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(ffcv_lr(step / steps, 1.7, epochs), rel=1e-6, abs=1e-9)

    # no weight decay on BatchNorm (FFCV: parameters named "bn"); here none on any norm layer or bias
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    # BlurPool where FFCV's apply_blurpool puts it: strided convs of 16 or more input channels
    blurred = [n for n, m in model.named_modules() if type(m).__name__ == "BlurConv2d"]
    expected = [
        n
        for n, m in build_model(
            dataclasses.replace(config, model=dataclasses.replace(config.model, blurpool=False)), pretrained=False
        ).named_modules()
        if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= 16
    ]
    assert blurred == expected and len(blurred) == 6


def test_blurpool_blurs_before_the_conv_and_keeps_the_weights_names():
    from models import create_model
    from models.blurpool import BlurConv2d

    plain, blurred = (create_model("resnet18", 10, "cbam", blurpool=b) for b in (False, True))
    assert plain.state_dict().keys() == blurred.state_dict().keys()
    blurred.load_state_dict(plain.state_dict())
    conv = blurred.layer2[0].conv1
    assert isinstance(conv, BlurConv2d)
    x = torch.randn(2, conv.in_channels, 9, 9)
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    blur = torch.nn.functional.conv2d(x, kernel.expand(conv.in_channels, 1, 3, 3), padding=1, groups=conv.in_channels)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(blur, conv.weight, stride=2, padding=1))


def _three_steps(model, optimizer):
    torch.manual_seed(3)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_lamb_is_timms_with_no_weight_decay_on_norms_and_biases():
    """optim=lamb against timm's own factory (create_optimizer_v2, filter_bias_and_bn) on the same model."""
    from timm.optim import create_optimizer_v2

    config = compose("experiment=smoke", "optim=lamb")
    assert (config.optim.lr, config.optim.weight_decay, config.optim.weight_decay_norm_bias) == (8e-3, 0.02, False)
    ours, theirs = build_model(config), build_model(config)
    theirs.load_state_dict(ours.state_dict())
    reference = create_optimizer_v2(theirs, "lamb", lr=8e-3, weight_decay=0.02, filter_bias_and_bn=True)
    optimizer = build_optimizer(ours, config.optim)
    assert type(optimizer) is type(reference)
    decayed = {g["weight_decay"]: len(g["params"]) for g in optimizer.param_groups}
    assert decayed == {g["weight_decay"]: len(g["params"]) for g in reference.param_groups} and 0.0 in decayed
    for a, b in zip(_three_steps(ours, optimizer), _three_steps(theirs, reference), strict=True):
        assert torch.equal(a, b)


def test_drop_path_grows_linearly_over_the_blocks_as_in_timms_resnets():
    from timm.layers import DropPath

    model = build_model(compose("experiment=smoke", "model.drop_path_rate=0.1"))
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])  # timm: rate * block index / (blocks - 1)


def test_drop_path_drops_the_attended_residual_branch_while_training():
    """Training: relu(drop_path(attention(bn(out))) + identity), the branch scaled by 1 / keep or dropped per
    sample (timm's drop_path with the same random draws); evaluation: the block without it (fused)."""
    from timm.layers import drop_path

    from models.resnet import BasicBlock

    block = BasicBlock(16, 16, attention=dataclasses.replace(PRESETS["cbam"], impl="fused"), drop_path=0.5)
    x = torch.randn(64, 16, 6, 6)
    torch.manual_seed(5)
    got = block.train()(x)
    branch = block.attn(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
    torch.manual_seed(5)
    expected = torch.relu(drop_path(branch, 0.5, True) + x)
    assert torch.allclose(got, expected, atol=1e-6)
    kept = (got - torch.relu(x)).flatten(1).abs().amax(1) > 0
    assert 10 < int(kept.sum()) < 54  # about half the samples keep their branch
    block.eval()
    with torch.no_grad():
        branch = block.attn(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
        assert torch.allclose(block(x), torch.relu(branch + x), atol=1e-5)


def test_drop_path_is_refused_where_it_cannot_apply():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.drop_path_rate must be in \[0, 1\), got 1.0"):
        compose("model.drop_path_rate=1.0")
    with pytest.raises(ValueError, match="MobileNet v1 has no residual branch to drop"):
        build_model(compose("experiment=smoke", "model=mobilenet_v1", "model.drop_path_rate=0.1"))


def test_mixer_is_timms_mixup_with_draws_from_the_run_seed_and_step():
    from timm.data import Mixup

    from engine.mixing import BatchMixer

    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    mixer = BatchMixer(mixup=0.1, cutmix=1.0, label_smoothing=0.1, num_classes=10, seed=3)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for step in range(6):  # both kinds of batch among them
        ours = mixer(x.clone(), y, step)
        np.random.seed(np.random.SeedSequence([3, step]).generate_state(1)[0])
        theirs = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)(x.clone(), y)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        np.random.seed(123)
    assert np.array_equal(np.random.get_state()[1], before)  # NumPy's global generator left as it was
    mixed, target = mixer(x.clone(), y, 0)
    assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))


def test_training_losses_are_timms():
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    from engine.mixing import training_loss

    logits, y = torch.randn(8, 10), torch.arange(8)
    soft = torch.softmax(torch.randn(8, 10), 1)
    t = compose("experiment=smoke", "trainer.loss=bce", "trainer.mixup=0.2").trainer
    expected = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)(logits, soft)
    assert torch.equal(training_loss(t, mixing=True)(logits, soft), expected)
    t = compose("experiment=smoke", "trainer.loss=bce", "trainer.label_smoothing=0.1").trainer
    expected = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, y)
    assert torch.equal(training_loss(t, mixing=False)(logits, y), expected)
    t = compose("experiment=smoke", "trainer.cutmix=1.0").trainer
    assert torch.equal(training_loss(t, mixing=True)(logits, soft), SoftTargetCrossEntropy()(logits, soft))


def test_mixing_an_odd_batch_is_refused():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.batch_size must be even .* got 63"):
        compose("experiment=smoke", "trainer.mixup=0.1", "trainer.batch_size=63")


def test_a_run_with_the_modern_parts_killed_and_resumed_is_bit_identical(tmp_path):
    """LAMB, drop path, RandAugment, Mixup and CutMix, binary cross-entropy and an EMA of the weights, killed
    after step 7 (its last checkpoint: step 6, mid-epoch) and resumed: the same weights, optimizer state, EMA
    and history as the uninterrupted run (drop path draws from torch's saved RNG, RandAugment from seed,
    epoch and batch, the mixer from seed and step)."""
    from helpers import assert_same_run, kill_in_process_then_resume, train_here

    recipe = [
        "experiment=smoke",
        "optim=lamb",
        "model.drop_path_rate=0.2",
        "data.randaugment=rand-m6-mstd0.5-inc1",
        "trainer.mixup=0.1",
        "trainer.cutmix=1.0",
        "trainer.loss=bce",
        "trainer.ema_decay=0.9",
        "model.width=0.25",
        "trainer.epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.image_every=0",
        "trainer.ckpt_every_steps=3",
    ]
    train_here(tmp_path / "whole", *recipe)
    killed = kill_in_process_then_resume(tmp_path / "killed", *recipe, kill_at_step=7)
    assert killed.mixer is not None and type(killed.train_criterion).__name__ == "BinaryCrossEntropy"
    assert killed.checkpoint_at_kill == 6
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_recipes_are_their_sources_and_scale_with_the_runs_length():
    """recipe=paper: the paper's ImageNet recipe, its lr steps at the thirds of any length; rsb_a3: timm's
    ResNet strikes back A3 (arguments of its published training command); modern: A3's parts at any length."""
    paper = compose("recipe=paper")
    o, s, t = paper.optim, paper.sched, paper.trainer
    assert (paper.recipe, o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == (
        "paper",
        "sgd",
        0.1,
        0.9,
        False,
        1e-4,
    )
    assert (s.name, s.decay_epochs, s.decay_rate, s.warmup_epochs, t.epochs, t.batch_size) == (
        "step",
        30,
        0.1,
        0,
        90,
        256,
    )
    assert (t.loss, t.mixup, t.cutmix, t.label_smoothing, paper.data.randaugment, paper.model.drop_path_rate) == (
        "ce",
        0,
        0,
        0,
        "",
        0,
    )
    assert compose("recipe=paper", "trainer.epochs=12").sched.decay_epochs == 4

    a3 = compose("recipe=rsb_a3", "data=imagenet", "data.root=/data")
    o, s, t, d = a3.optim, a3.sched, a3.trainer, a3.data
    assert (a3.recipe, o.name, o.lr, o.weight_decay, o.weight_decay_norm_bias) == ("rsb_a3", "lamb", 8e-3, 0.02, False)
    assert (s.name, s.per_step, s.warmup_epochs, t.epochs, t.batch_size) == ("cosine", True, 5, 100, 2048)
    assert (t.loss, t.bce_target_threshold, t.mixup, t.cutmix, t.label_smoothing) == ("bce", 0.2, 0.1, 1.0, 0)
    assert (d.randaugment, a3.model.drop_path_rate) == ("rand-m6-mstd0.5-inc1", 0.05)
    assert (d.image_size, d.eval_size, d.resize_size) == (160, 224, 235)  # timm: crop_pct 0.95, floor(224 / 0.95)

    modern = compose("recipe=modern", "trainer.epochs=6")
    assert modern.sched.warmup_epochs == pytest.approx(0.3)
    same = (
        "optim.name",
        "optim.lr",
        "optim.weight_decay",
        "trainer.loss",
        "trainer.mixup",
        "trainer.cutmix",
        "data.randaugment",
    )
    for key in same:
        group, name = key.split(".")
        assert getattr(getattr(modern, group), name) == getattr(getattr(a3, group), name), key


@pytest.mark.parametrize("experiment", ["paper/table1", "paper/table2", "paper/table3", "paper/table4", "paper/table5"])
def test_paper_experiments_train_with_the_paper_recipe_unless_told_otherwise(experiment):
    config = compose(f"experiment={experiment}", "data.root=/data")
    assert config.recipe == "paper" and config.optim.name == "sgd" and config.trainer.epochs == 90
    config = compose(f"experiment={experiment}", "recipe=rsb_a3", "data.root=/data")
    assert config.recipe == "rsb_a3" and config.optim.name == "lamb" and config.trainer.epochs == 100
    assert config.data.name == "imagenet" and config.data.image_size == 160
