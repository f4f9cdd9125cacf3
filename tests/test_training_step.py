"""The training step: it reads nothing back from the device between logging steps, a step whose loss
or gradients are not finite leaves no trace, and a run that keeps producing them stops with a
checkpoint of finite weights."""

import copy

import pytest
import torch

from engine.syncs import SyncCounter, count_step_syncs
from engine.trainer import NonFiniteError, Trainer
from helpers import TINY, assert_equal_tree, compose, final_checkpoint


@pytest.mark.parametrize("extra", [[], ["trainer.grad_clip=1.0", "optim=adamw"]], ids=["sgd", "adamw, clipped"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, extra):
    """Between logging steps (every 4th here) no step calls anything that would wait for a GPU: the loss,
    accuracy and skipped-step count stay on the device until a logging step reads them."""
    trainer = Trainer(compose("experiment=smoke", *TINY, "trainer.epochs=1", "trainer.log_every=4", *extra), tmp_path)
    with SyncCounter(trainer.device) as counter:
        counted = count_step_syncs(trainer, counter)
        results = trainer.fit()
    assert results["steps"] == 8 and counted["steps"] == 6  # steps 4 and 8 log
    assert counter.calls == [], f"synchronising calls inside training steps: {counter.calls}"


def test_the_sync_counter_sees_a_read_of_the_loss(tmp_path):
    """The check above cannot pass by accident: a step that reads its loss is counted."""
    trainer = Trainer(compose("experiment=smoke", *TINY, "trainer.epochs=1", "trainer.log_every=4"), tmp_path)
    real_step = trainer.train_step

    def reading_step(x, y):
        real_step(x, y)
        float(trainer.meter.sums[0])

    trainer.train_step = reading_step
    with SyncCounter(trainer.device) as counter:
        count_step_syncs(trainer, counter)
        trainer.fit()
    assert counter.calls == ["__float__"] * 6


def _state(trainer: Trainer) -> dict:
    """Weights, running statistics and optimizer state; BatchNorm's ``num_batches_tracked`` left out (a
    counter read only by BatchNorm without momentum)."""
    model = {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {"model": model, "optimizer": copy.deepcopy(trainer.optimizer.state_dict())}


def _poison(trainer: Trainer, steps) -> dict:
    """NaN in one image of the batches of ``steps`` (their forward poisons the batch statistics too);
    returns the state before and after each poisoned step."""
    real_step, seen = trainer.train_step, {}

    def step(x, y):
        if trainer.global_step in steps:
            before = _state(trainer)
            x = x.clone()
            x[0] = float("nan")
            real_step(x, y)
            seen[trainer.global_step - 1] = (before, _state(trainer))
        else:
            real_step(x, y)

    trainer.train_step = step
    return seen


@pytest.mark.parametrize("poisoned_step", [0, 5])
def test_a_step_with_a_nan_changes_nothing_and_the_run_goes_on(tmp_path, poisoned_step):
    trainer = Trainer(compose("experiment=smoke", *TINY, "trainer.epochs=1"), tmp_path)
    seen = _poison(trainer, {poisoned_step})
    results = trainer.fit()
    before, after = seen[poisoned_step]
    assert_equal_tree(before, after, "the poisoned step")  # weights, BN statistics, momentum: untouched
    assert results["steps"] == 8 and results["skipped_steps"] == 1
    ckpt = final_checkpoint(tmp_path)
    for part in ("model", "optimizer"):
        tensors = [t for t in _leaves(ckpt[part]) if t.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), part
    assert all(torch.isfinite(torch.tensor(h["train"]["loss"])) for h in results["history"])  # skipped step left out


def test_steps_that_stay_non_finite_stop_the_run_with_a_checkpoint_of_finite_weights(tmp_path):
    trainer = Trainer(
        compose("experiment=smoke", *TINY, "trainer.log_every=1", "trainer.max_nonfinite_steps=3"), tmp_path
    )
    _poison(trainer, set(range(4, 100)))
    with pytest.raises(
        NonFiniteError,
        match=r"not finite in the last 3 steps \(up to step 7, epoch 1, batch 7\); "
        r"their updates were skipped, and stopped with a checkpoint of the "
        r"last finite weights, .*last\.pt\. Fix: lower optim\.lr",
    ):
        trainer.fit()
    ckpt = final_checkpoint(tmp_path)
    assert ckpt["progress"]["global_step"] == 7
    assert all(torch.isfinite(t).all() for t in _leaves(ckpt["model"]) if t.is_floating_point())


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
