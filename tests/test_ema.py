"""The exponential moving average of the weights (trainer.ema_decay, timm's ModelEmaV3): what it holds, how
it is reported, and that a resumed run continues it exactly."""

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from cbam.errors import UserError
from engine.config import EvalConfig
from engine.trainer import Trainer
from helpers import ROOT, TINY, assert_same_run, compose, final_checkpoint, kill_in_process_then_resume, results

SHORT = ["experiment=smoke", *TINY, "trainer.limit_train_batches=4", "trainer.limit_val_batches=1"]
EMA = [*SHORT, "trainer.image_every=0", "trainer.ema_decay=0.9", "trainer.ckpt_every_steps=3"]


def evaluate_checkpoint(path, **options) -> dict:
    """eval.py's evaluation, in this process."""
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate_checkpoint(OmegaConf.structured(EvalConfig(checkpoint=str(path), **options)))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A run with an EMA, and the trained weights after each of its steps (float64)."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    trainer = Trainer(compose(*EMA, "trainer.epochs=2", run_dir=run_dir), run_dir)
    after_each_step, real_step = [], trainer.train_step

    def step(x, y):
        real_step(x, y)
        state = trainer.model.state_dict()
        after_each_step.append({k: v.detach().double().clone() for k, v in state.items() if v.is_floating_point()})

    trainer.train_step = step
    return run_dir, trainer.fit(), after_each_step


def test_ema_weights_equal_a_hand_computed_ema(ema_run):
    """ema = w_1 after the first step, then ema = 0.9 ema + 0.1 w_t: parameters and BatchNorm statistics."""
    run_dir, _, after_each_step = ema_run
    assert len(after_each_step) == 8
    ema = after_each_step[0]
    for weights in after_each_step[1:]:
        ema = {k: 0.9 * ema[k] + 0.1 * weights[k] for k in ema}
    ckpt = final_checkpoint(run_dir)
    for name, expected in ema.items():
        torch.testing.assert_close(ckpt["ema"][name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ema)  # not the trained weights


def test_the_ema_is_evaluated_each_epoch_and_reported(ema_run):
    run_dir, res, _ = ema_run
    assert [set(h) for h in res["history"]] == [{"epoch", "train", "val", "val_ema", "lr"}] * 2
    final = res["history"][-1]["val_ema"]
    assert res["ema"]["top1"] == final["top1"] and res["ema"]["loss"] == final["loss"]
    assert res["ema"]["best_top1"] == max(h["val_ema"]["top1"] for h in res["history"])
    assert results(run_dir)["ema"] == res["ema"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.value for e in events.Scalars("val_ema/top1")] == pytest.approx(
        [h["val_ema"]["top1"] for h in res["history"]]
    )


def test_eval_py_evaluates_the_ema_weights_on_request(ema_run):
    run_dir, res, _ = ema_run
    checkpoint = run_dir / "checkpoints" / "last.pt"
    ema = evaluate_checkpoint(checkpoint, ema=True, limit_val_batches=1)
    trained = evaluate_checkpoint(checkpoint, limit_val_batches=1)
    assert (ema["weights"], ema["top1"], ema["loss"]) == ("ema", res["ema"]["top1"], pytest.approx(res["ema"]["loss"]))
    assert (trained["weights"], trained["top1"]) == ("trained", res["top1"])


def test_asking_for_the_ema_of_a_run_without_one_is_refused(tmp_path):
    Trainer(compose(*SHORT, "trainer.epochs=1", "trainer.image_every=0", run_dir=tmp_path), tmp_path).fit()
    with pytest.raises(UserError, match=r"holds no EMA of the weights \(its run had trainer.ema_decay=0\)"):
        evaluate_checkpoint(tmp_path / "checkpoints" / "last.pt", ema=True)
    with pytest.raises(UserError, match=r"trainer.ema_decay must be in \[0, 1\)"):
        compose(*SHORT, "trainer.ema_decay=1")


def test_a_run_killed_and_resumed_continues_its_ema_bit_identically(ema_run, tmp_path):
    """Killed after step 7 (its last checkpoint: step 6, mid-epoch), then resumed: the same weights, EMA and
    history."""
    reference, _, _ = ema_run
    killed = kill_in_process_then_resume(tmp_path, *EMA, "trainer.epochs=2", kill_at_step=7)
    assert killed.checkpoint_at_kill == 6
    assert_same_run(reference, tmp_path)
