"""One training run: build everything from a resolved config, train, evaluate, log, checkpoint.

Only the entry points run Hydra; this module takes the typed config (``engine.config.TrainConfig``, which
checked its own values) and a run directory. ``Trainer.fit`` is the loop, on one screen; the helpers
below it do one thing each.
A run can be stopped at any step and resumed to exactly where it would have been: the data order and
augmentation are functions of (seed, epoch, batch), the lr a function of (epoch, step), and a
checkpoint holds everything else (weights, optimizer, scaler, meters, RNGs).

A training step reads nothing back from the device: a non-finite loss or gradient skips its update on
the device (``engine.update``); the host reads the losses, the accuracy and the count of skipped steps
on logging steps (``trainer.log_every``) and at epoch ends. With several processes the ranks agree
whether to stop over a CPU channel, every few steps (as many as fit in a quarter of the stop's grace
period at the measured step time), instead of a device collective every step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from analysis.profile import count_gmacs, count_params
from cbam.errors import RunFolderInUse, UserError
from cbam.fused import auto_uses_fused
from cbam.modules import AttentionModule

from . import checkpoint as ckpt_io
from . import distributed as dist
from .clock import Clock
from .config import TrainConfig, as_dict
from .data import build_batches
from .device import amp_dtype, autocast, compile_mode, resolve_device, set_cudnn_benchmark, set_tf32
from .evaluation import evaluate
from .files import write_atomic
from .loggers import build_logger
from .metrics import Meter
from .mixing import build_mixer, training_loss
from .network import build_model
from .optim import build_optimizer, build_scheduler
from .stopping import StopNow, StopRequest
from .tblog import CHARTS, METRICS, log_attention, write_hparams
from .update import GuardedUpdate

log = logging.getLogger("cbam")

# The first steps of each process compile kernels (fused CBAM, trainer.compile) and fill the allocator;
# they count in train_s/wall_s but not in train_img_per_s, which is the steady-state rate.
WARMUP_STEPS = 3


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (all of which a checkpoint stores) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteError(UserError):
    """The loss or the gradients stayed NaN or infinite for ``trainer.max_nonfinite_steps`` steps."""


class Trainer:
    """One run. ``stop``: the run's ``StopRequest`` when the caller installed it before building the
    trainer (``train.py``, so that a signal during data loading is handled too); else ``fit`` installs one."""

    def __init__(self, config: TrainConfig, run_dir: Path, stop: StopRequest | None = None, overrides: list[str] = ()):
        """``overrides``: the Hydra overrides that set this run apart (a single run's command line, a sweep
        job's swept values), shown in TensorBoard's HParams tab."""
        self.config, self.overrides = config, list(overrides)
        self.config_dict = as_dict(config)  # as checkpoints, results.json and the HParams tab hold it
        self.t, self.d = config.trainer, config.data
        self.stop = stop or StopRequest(self.t.stop_grace_s)
        self.device = resolve_device(self.t.device)
        self.rank, self.world_size = dist.init_from_env(self.device)
        self.main = self.rank == 0
        self._setup_run_dir(Path(run_dir))
        if self.t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        set_cudnn_benchmark(self.device, not self.t.deterministic)
        set_tf32(self.device, self.t.tf32)
        seed_everything(config.seed)
        self.amp_dtype = amp_dtype(self.t.amp, self.device)
        self._setup_data()
        self._setup_model()
        self._setup_optimization()

        # Where the next step starts, and what has been measured so far (a checkpoint restores both).
        self.epoch, self.next_batch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch, self.history = -1.0, -1, []
        self.clock, self.wall_before = Clock(WARMUP_STEPS), 0.0
        self.meter = Meter(self.device)
        if self.resume_path is not None:
            self._load(self.resume_path)
        self.saved_step, self.last_checkpoint = self.global_step, self.resume_path  # the newest checkpoint
        self.stop_interval = 1  # steps between the ranks' agreements on stopping (``_stop_agreed``)
        self.logger = build_logger(config.logger.name, self.run_dir) if self.main else None
        if self.logger is not None:
            self.logger.charts(CHARTS)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict | None:
        """Train to ``trainer.epochs``, evaluating, checkpointing and logging after each epoch; the results,
        or None when a stop request (SIGTERM, SIGINT, SLURM's SIGUSR1/2) ended the run first."""
        self.start_wall = time.time()
        with self.stop:
            try:
                self._announce()
                while self.epoch < self.t.epochs:
                    if self._stop_agreed(every_step=True) or not self._train_epoch():
                        return self._stopped()
                    self._end_epoch(self.evaluate())
                return self._finish()
            except StopNow:  # the grace period ran out in the middle of work (compiling, evaluating, loading)
                return self._stopped(overdue=True)
            finally:
                self.train_batches.close()  # the input's worker processes, shared by both splits
                dist.cleanup()

    def _train_epoch(self) -> bool:
        """The epoch's steps from ``next_batch`` on; False if a stop request ended it early."""
        self.model.train()
        self.scheduler.step(self.epoch)
        self.epoch_tic = time.perf_counter()
        bar = self._progress_bar()
        self.clock.resume()
        for x, y in self.train_batches.batches(self.epoch, self.next_batch, self.steps_per_epoch):
            self.train_step(x, y)
            self.clock.step(x.shape[0] * self.world_size)
            bar.update(1)
            if self.global_step % self.t.log_every == 0 or self.next_batch == self.steps_per_epoch:
                self._log_progress(bar)  # reads the device: the losses, accuracy and skipped steps
            if self.t.ckpt_every_steps and self.global_step % self.t.ckpt_every_steps == 0:
                self.clock.pause()
                self._save(("last.pt",))
                self.clock.resume()
            if self.next_batch < self.steps_per_epoch and self._stop_agreed():
                break
        self.clock.pause()
        bar.close()
        return self.next_batch == self.steps_per_epoch

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward, backward and the guarded update of one batch; advances ``global_step`` and ``next_batch``.
        Nothing here waits for the device."""
        self.scheduler.step_update(self.global_step)
        self.update.before_forward()
        target = y  # under Mixup/CutMix, the meter keeps counting against the labels of the unmixed images
        if self.mixer is not None:
            x, target = self.mixer(x, y, self.global_step)
        loss, logits = self._forward_backward(x, target)
        with self.stop.critical():  # the update and its bookkeeping: a late stop waits for them
            skipped = self.update.step(loss)
            self.meter.update(loss, logits, y, skip=skipped)
            self.global_step += 1
            self.next_batch += 1
            if self.ema is not None:  # on the device; its first update copies the weights
                self.ema.update(self.model, step=self.global_step)

    def _forward_backward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, gradients computed. A compiled model compiles in this process's
        first step (announced and timed); one that fails to compile or run falls back to eager mode,
        with one warning."""
        first_compiled = self.compile_mode is not None and self.clock.steps == 0
        if first_compiled and self.main:
            inductor = self.t.compile_backend == "inductor"
            log.info(
                "torch.compile (%s %s): compiling the model in the first training step%s",
                "mode" if inductor else "backend",
                self.compile_mode,
                "; with a cold inductor cache this can take minutes" if inductor else "",
            )
        tic = time.perf_counter()
        try:
            result = self._forward_backward_with(self.train_model, x, target)
        except UserError:
            raise
        except Exception as err:
            if self.train_model is self.eager_model:
                raise
            self._compile_failed(err)
            return self._forward_backward_with(self.train_model, x, target)
        if first_compiled and self.main:
            log.info("torch.compile: the first step, compilation included, took %.1f s", time.perf_counter() - tic)
        return result

    def _forward_backward_with(self, model, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``target``: the labels, or Mixup/CutMix's soft targets."""
        if self.compile_mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, self.amp_dtype):
            logits = model(self._inputs(x))
            loss = self.train_criterion(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def evaluate(self) -> dict:
        """The validation split's loss and top-1/top-5, summed over the ranks; with an EMA of the weights,
        its figures too, under ``"ema"``."""
        self.eval_tic = time.perf_counter()
        val = self._evaluate(self.model)
        if self.ema is not None:
            val["ema"] = self._evaluate(self.ema.module)
        return val

    def _evaluate(self, model: torch.nn.Module) -> dict:
        t = self.t
        meter = evaluate(
            model,
            self.val_batches,
            self.criterion,
            self.device,
            self.amp_dtype,
            t.channels_last,
            t.limit_val_batches,
            t.eval_flip,
        )
        return meter.summary(dist.all_reduce_sum(meter.sums))

    def _end_epoch(self, val: dict) -> None:
        """Record the epoch (history, best), checkpoint it, log it; a stop now waits for all of that."""
        with self.stop.critical():
            train = self.meter.summary(dist.all_reduce_sum(self.meter.sums))
            self.epoch, self.next_batch, self.meter = self.epoch + 1, 0, Meter(self.device)
            is_best = val["top1"] > self.best_top1
            if is_best:
                self.best_top1, self.best_epoch = val["top1"], self.epoch
            lr = self.optimizer.param_groups[0]["lr"]
            ema = val.pop("ema", None)
            self.history.append({"epoch": self.epoch, "train": train, "val": val, "lr": lr})
            if ema is not None:
                self.history[-1]["val_ema"] = ema
            self._save(("last.pt", "best.pt") if is_best else ("last.pt",))
            if self.main:
                self._log_epoch(train, val, ema, is_best)

    def _finish(self) -> dict:
        results = self._results(self.wall_before + time.time() - self.start_wall)
        if self.main:
            final = {
                "val/top1": results["top1"],
                "val/top1_best": results["best_top1"],
                "val/top5": results["top5"],
                "train/img_per_s": results["train_img_per_s"],
            }
            size = {"params_M": self.params / 1e6, "GMACs": self.gmacs}
            write_hparams(self.logger, self.config_dict, {tag: final[tag] for tag in METRICS}, self.overrides, size)
            self.logger.close()
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2))
            log.info(
                "done: top-1 %.2f%%, top-5 %.2f%% (best top-1 %.2f%%); results in %s",
                results["top1"],
                results["top5"],
                results["best_top1"],
                self.run_dir,
            )
        return results

    def _stopped(self, overdue: bool = False) -> None:
        """The one way a stopped run ends: a checkpoint of what finished since the last one, one message.
        ``overdue``: the stop interrupted work in progress, and the ranks may be anywhere (no collective:
        rank 0's meters alone)."""
        self.stop.settle()
        if self.global_step > self.saved_step:
            self._save(("last.pt",), collective=not overdue)
        if self.logger is not None:
            self.logger.close()  # the scalars since the last epoch's flush
        if self.main:
            where = f"epoch {self.epoch + 1}, batch {self.next_batch}"
            saved = self.last_checkpoint
            state = (
                f"checkpoint {saved}; continue with resume=auto (same hydra.run.dir) or resume={saved}"
                if saved
                else "nothing to save"
            )
            if overdue:
                log.warning(
                    "stopped in the middle of work at %s (it did not reach a step's end within %g s); %s",
                    where,
                    self.stop.grace_s,
                    state,
                )
            else:
                log.warning("stopped at %s; %s", where, state)
        return None

    # ---- what the loop asks ----------------------------------------------------------------------
    def _stop_agreed(self, every_step: bool = False) -> bool:
        """Whether the run stops here, the same answer on every rank: a stop request's flag alone in one
        process; with several, an agreement over the CPU (``distributed.agree``) every ``stop_interval``
        steps, which it sets anew from the measured step time (``every_step``: at this point regardless)."""
        if self.world_size == 1:
            return self.stop.requested
        if not every_step and self.global_step % self.stop_interval:
            return False
        step_s = self.clock.step_s
        proposal = max(1, min(1000, int(self.stop.grace_s / 4 / step_s))) if step_s > 0 else 1
        stop, self.stop_interval = dist.agree(self.stop.requested, proposal)
        return stop

    def _check_nonfinite(self) -> None:
        """Read the count of skipped steps (a synchronisation: logging steps and epoch ends only); stop with a
        checkpoint of the last finite weights once ``trainer.max_nonfinite_steps`` in a row were skipped."""
        skipped, in_a_row = self.update.counts()
        if skipped > self.skipped_reported:
            if self.main:
                log.warning(
                    "%d step(s) skipped: the loss or the gradients were not finite (%d in all, %d in a row "
                    "up to step %d)",
                    skipped - self.skipped_reported,
                    skipped,
                    in_a_row,
                    self.global_step,
                )
            self.skipped_reported = skipped
        if in_a_row < self.t.max_nonfinite_steps:
            return
        try:
            saved = f"stopped with a checkpoint of the last finite weights, {self._save(('last.pt',))}"
        except ckpt_io.NonFiniteWeights:
            saved = "the weights are not finite either; no checkpoint written" + (
                f" (the last good one: {self.last_checkpoint})" if self.last_checkpoint else ""
            )
        raise NonFiniteError(
            f"the loss or the gradients were not finite in the last {in_a_row} steps (up to step {self.global_step},"
            f" epoch {self.epoch + 1}, batch {self.next_batch}); their updates were skipped, and {saved}. Fix: "
            "lower optim.lr, set trainer.grad_clip, or use trainer.amp=bf16."
        )

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save(self, names: tuple[str, ...], collective: bool = True) -> Path | None:
        """Checkpoint under each of ``names`` (rank 0 writes; every rank calls this unless ``collective`` is
        False, and then rank 0's meters alone are saved); returns the first file. Refuses non-finite weights."""
        sums = dist.all_reduce_sum(self.meter.sums) if collective else self.meter.sums
        if self.main:
            self._write_checkpoint(names, sums)
        self.saved_step, self.last_checkpoint = self.global_step, self.ckpt_dir / names[0]  # on every rank
        return self.last_checkpoint

    def _write_checkpoint(self, names: tuple[str, ...], meter_sums: torch.Tensor) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config_dict,
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "meter": meter_sums.cpu(),
            "rng": ckpt_io.rng_state(),
            "progress": {
                "epoch": self.epoch,
                "next_batch": self.next_batch,
                "global_step": self.global_step,
                "best_top1": self.best_top1,
                "best_epoch": self.best_epoch,
                "history": self.history,
                "train_time": self.clock.train_s,
                "train_images": self.clock.images,
                "wall_s": self.wall_before + time.time() - self.start_wall,
            },
        }
        with self.stop.critical():
            ckpt_io.save_run(state, [self.ckpt_dir / name for name in names], step=self.global_step)

    def _load(self, path: Path) -> None:
        ckpt = ckpt_io.load(path)
        ckpt_io.check_same_architecture(ckpt["config"], self.config_dict, path)
        self.model.load_state_dict(ckpt["model"])
        ckpt_io.load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:  # a checkpoint written without an EMA: it starts from the weights now
            self.ema.module.load_state_dict(ckpt.get("ema") or self.model.state_dict())
        p = ckpt["progress"]
        self.epoch, self.next_batch, self.global_step = p["epoch"], p["next_batch"], p["global_step"]
        self.best_top1, self.best_epoch, self.history = p["best_top1"], p["best_epoch"], p["history"]
        self.clock, self.wall_before = Clock(WARMUP_STEPS, p["train_time"], p["train_images"]), p["wall_s"]
        if self.main and ckpt.get("meter") is not None:  # the ranks' sums: counted once, on rank 0
            self.meter = Meter(self.device, ckpt["meter"])
        ckpt_io.set_rng_state(ckpt["rng"])
        log.info(
            "resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch + 1, self.next_batch, self.global_step
        )

    # ---- logging ---------------------------------------------------------------------------------
    def _announce(self) -> None:
        if self.main and self.t.image_every and self.epoch == 0 and self.next_batch == 0:
            log_attention(self.logger, self.model, self.fixed_images, 0)
        if self.main:
            log.info(
                "%s: %s + %s on %s, %.3fM params, %.4f GMACs, %d steps/epoch, device %s x%d; %s",
                self.config.name,
                self.config.model.arch,
                self.config.attention.name,
                self.d.name,
                self.params / 1e6,
                self.gmacs,
                self.steps_per_epoch,
                self.device,
                self.world_size,
                ", ".join(f"{k} {v}" for k, v in self.settings().items()),
            )

    def _progress_bar(self) -> tqdm:
        return tqdm(
            total=self.steps_per_epoch,
            initial=self.next_batch,
            desc=f"epoch {self.epoch + 1}/{self.t.epochs}",
            disable=not (self.main and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )

    def _log_progress(self, bar: tqdm) -> None:
        """A logging step: the epoch's running loss and accuracy, lr, images/s and the ETA (rank 0), and the
        count of skipped steps (every rank, for the same decision)."""
        self._check_nonfinite()
        img_per_s = self.clock.lap()
        if not self.main:
            return
        s, lr = self.meter.summary(), self.optimizer.param_groups[0]["lr"]
        self.logger.scalar("train/loss_running", s["loss"], self.global_step)  # the epoch's mean so far
        if not bar.disable:
            bar.set_postfix(loss=f"{s['loss']:.4f}", top1=f"{s['top1']:.2f}", img_s=f"{img_per_s:.0f}", lr=f"{lr:.3g}")
            return
        epoch_left = self.steps_per_epoch - self.next_batch
        run_left = epoch_left + (self.t.epochs - self.epoch - 1) * self.steps_per_epoch  # training steps
        eta = (
            (
                f"eta epoch {self.clock.eta(epoch_left, self.t.batch_size):.0f}s, "
                f"run {self.clock.eta(run_left, self.t.batch_size):.0f}s"
            )
            if self.clock.img_per_s
            else "eta -"
        )
        log.info(
            "epoch %d/%d step %d/%d loss %.4f top-1 %.2f%% lr %.4g %s img/s %s",
            self.epoch + 1,
            self.t.epochs,
            self.next_batch,
            self.steps_per_epoch,
            s["loss"],
            s["top1"],
            lr,
            f"{img_per_s:.0f}" if img_per_s else "-",
            eta,
        )

    def _log_epoch(self, train: dict, val: dict, ema: dict | None, is_best: bool) -> None:
        logger = self.logger
        for split, s in (("train", train), ("val", val), ("val_ema", ema)):
            for k in ("loss", "top1", "top5", "top1_err", "top5_err") if s is not None else ():
                logger.scalar(f"{split}/{k}", s[k], self.epoch)
        logger.scalar("val/top1_best", self.best_top1, self.epoch)
        logger.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.epoch)
        logger.scalar("train/img_per_s", self.clock.img_per_s, self.epoch)
        logger.scalar("train/time_s_total", self.clock.train_s, self.epoch)
        if self.t.image_every and (self.epoch % self.t.image_every == 0 or self.epoch == self.t.epochs):
            log_attention(logger, self.model, self.fixed_images, self.epoch)
        logger.scalar("val/time_s", time.perf_counter() - self.eval_tic, self.epoch)  # with the attention maps
        logger.scalar("train/epoch_s", time.perf_counter() - self.epoch_tic, self.epoch)  # and evaluation
        logger.flush()
        log.info(
            "epoch %d/%d: train loss %.4f top-1 %.2f%% | val loss %.4f top-1 %.2f%% top-5 %.2f%%%s",
            self.epoch,
            self.t.epochs,
            train["loss"],
            train["top1"],
            val["loss"],
            val["top1"],
            val["top5"],
            " (best)" if is_best else "",
        )
        if ema is not None:
            message = "epoch %d/%d: EMA of the weights: val loss %.4f top-1 %.2f%% top-5 %.2f%%"
            log.info(message, self.epoch, self.t.epochs, ema["loss"], ema["top1"], ema["top5"])

    # ---- setup -----------------------------------------------------------------------------------
    def _setup_run_dir(self, run_dir: Path) -> None:
        self.run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's folder is the run's
        if not self.main and run_dir != self.run_dir:
            _remove_if_empty(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.t.batch_size % self.world_size:
            raise UserError(
                f"trainer.batch_size={self.t.batch_size} (the global batch) must be divisible by the "
                f"{self.world_size} processes"
            )
        self.resume_path = self._resume_path(self.config.resume)
        if self.main:
            self._check_writable()

    def _setup_data(self) -> None:
        eval_batch = self.t.eval_batch_size or self.t.batch_size
        self.train_batches, self.val_batches = build_batches(
            self.d,
            self.t.batch_size // self.world_size,
            max(1, eval_batch // self.world_size),
            self.config.seed,
            self.device,
            self.rank,
            self.world_size,
            dtype=self.amp_dtype or torch.float32,
        )
        self.steps_per_epoch = len(self.train_batches)
        if self.t.limit_train_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, self.t.limit_train_batches)
        if self.steps_per_epoch < 1:
            raise UserError(
                f"trainer.batch_size={self.t.batch_size} is larger than the training set "
                f"({self.train_batches.num_samples} images): no full batch per epoch"
            )
        # a fixed validation batch for TensorBoard's attention maps (float32, as the maps are computed)
        self.fixed_images = self._inputs(next(iter(self.val_batches.batches(stop=1)))[0][:8].float())

    def _setup_model(self) -> None:
        self.model = build_model(self.config, pretrained=self.resume_path is None)
        self.params = count_params(self.model)
        self.gmacs = count_gmacs(self.model, (self.d.in_chans, self.d.image_size, self.d.image_size))
        self.model.to(self.device)
        if self.t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # The EMA's copy before SyncBatchNorm: it is evaluated by each process alone.
        self.ema = (
            ModelEmaV3(self.model, decay=self.t.ema_decay, use_warmup=self.t.ema_warmup) if self.t.ema_decay else None
        )
        if self.world_size > 1 and self.t.sync_bn:
            self.model = dist.convert_sync_batchnorm(self.model, self.device)
        self.eager_model = self.model
        distributed = torch.distributed.is_initialized()  # under torchrun, even as its only process
        if distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.eager_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # DDP first, then the compiler: dynamo's DDPOptimizer splits the graph at DDP's gradient buckets
        backend = self.t.compile_backend
        self.compile_mode = compile_mode(self.t.compile, self.t.compile_mode, self.device, distributed, backend)
        self.train_model = self.eager_model
        if self.compile_mode is not None:
            mode = self.compile_mode if backend == "inductor" else None
            try:
                self.train_model = torch.compile(self.eager_model, backend=backend, mode=mode)
            except Exception as err:  # as a failure in the first step: eager mode, one warning
                self._compile_failed(err)

    def _setup_optimization(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config.optim)
        self.scheduler = build_scheduler(self.optimizer, self.config.sched, self.t.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.t.label_smoothing)  # evaluation's
        self.mixer = build_mixer(self.t, self.config.data.num_classes, self.config.seed)
        self.train_criterion = training_loss(self.t, mixing=self.mixer is not None)
        self.update = GuardedUpdate(self.model, self.optimizer, self.scaler, self.t.grad_clip)
        self.skipped_reported = 0

    def _resume_path(self, resume: str | None) -> Path | None:
        last = self.ckpt_dir / "last.pt"
        if resume is None:
            if last.exists():
                raise RunFolderInUse(
                    f"{self.run_dir} already holds a run ({last}); nothing was overwritten. Fix: pass resume=auto "
                    "to continue it, or choose another hydra.run.dir."
                )
            return None
        if resume == "auto":
            return last if last.exists() else None
        if not Path(resume).is_file():
            raise UserError(f"resume={resume!r}: no such checkpoint file. Fix: pass an existing path, auto or null.")
        return Path(resume)

    def _check_writable(self) -> None:
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = self.ckpt_dir / f".write_test_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"cannot write to the output directory {self.run_dir} ({exc.strerror}). Fix: choose a writable "
                "paths.log_dir or hydra.run.dir."
            ) from None

    def _compile_failed(self, err: Exception) -> None:
        log.warning(
            "torch.compile of the model failed (%s: %s); training continues in eager mode",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        self.train_model, self.compile_mode = self.eager_model, None

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.t.channels_last else x

    # ---- what the run reports --------------------------------------------------------------------
    def settings(self) -> dict:
        """What the ``auto`` settings resolved to on this device (and any fallback since)."""
        impls = {m.impl for m in self.model.modules() if isinstance(m, AttentionModule)}
        fused = any(i == "fused" or (i == "auto" and auto_uses_fused(self.device.type)) for i in impls)
        attention = self.config.attention.spec().enabled  # timm's layers and BAM run plain autograd
        return {
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
            "tf32": self.t.tf32 and self.device.type == "cuda",
            "compile": self.compile_mode or "off",
            "attention_impl": "fused" if fused and self.compile_mode is None else "reference" if attention else "none",
        }

    def _results(self, wall_s: float) -> dict:
        final = self.history[-1]["val"]
        return {
            "status": "finished",
            "settings": self.settings(),
            "top1": final["top1"],
            "top5": final["top5"],
            "top1_err": final["top1_err"],
            "top5_err": final["top5_err"],
            "val_loss": final["loss"],
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "params": self.params,
            "gmacs": self.gmacs,
            "epochs": self.epoch,
            "steps": self.global_step,
            "wall_s": wall_s,
            "train_s": self.clock.train_s + self.clock.warmup_s,
            "warmup_s": self.clock.warmup_s,
            "train_img_per_s": self.clock.img_per_s,
            "skipped_steps": self.update.counts()[0],
            "ema": self._ema_results(),
            "history": self.history,
            "config": self.config_dict,
        }

    def _ema_results(self) -> dict | None:
        """The EMA's final validation figures and its best top-1 (None without an EMA)."""
        epochs = [h for h in self.history if "val_ema" in h]
        if self.ema is None or not epochs:
            return None
        final, best = epochs[-1]["val_ema"], max(epochs, key=lambda h: h["val_ema"]["top1"])
        keys = ("top1", "top5", "top1_err", "top5_err", "loss")
        return {**{k: final[k] for k in keys}, "best_top1": best["val_ema"]["top1"], "best_epoch": best["epoch"]}


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
