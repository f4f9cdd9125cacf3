"""One training run: build everything from a resolved config, train, evaluate, log, checkpoint.

Only the entry points know about Hydra; this module takes a plain dict (``engine.config.to_container``)
and a run directory. A run can be stopped at any step and resumed to exactly where it would have
been: the data order and augmentation are functions of (seed, epoch, batch), the lr a function of
(epoch, step), and a checkpoint holds everything else (weights, optimizer, scaler, meters, RNGs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cbam.errors import RunFolderInUse, UserError
from cbam.fused import auto_uses_fused
from cbam.modules import AttentionModule

from . import checkpoint as ckpt_io
from . import distributed as dist
from .data import build_batches
from .device import amp_dtype, autocast, compile_mode, resolve_device, set_cudnn_benchmark, set_tf32
from .loggers import build_logger
from .metrics import Meter
from .optim import build_optimizer, build_scheduler
from .profile import count_gmacs, count_params
from .shared import build_model, evaluate
from .stopping import StopNow, StopRequest
from .tblog import CHARTS, METRICS, log_attention, write_hparams

log = logging.getLogger("cbam")


def validate(config: dict) -> None:
    """Refuse values that no schema type can express, before any work starts."""
    t, o, d = config["trainer"], config["optim"], config["data"]
    problems = [
        (o["lr"] <= 0, f"optim.lr must be > 0, got {o['lr']}"),
        (t["batch_size"] < 1, f"trainer.batch_size must be >= 1, got {t['batch_size']}"),
        (t["epochs"] < 1, f"trainer.epochs must be >= 1, got {t['epochs']}"),
        (t["eval_batch_size"] < 0, f"trainer.eval_batch_size must be >= 0, got {t['eval_batch_size']}"),
        (o["weight_decay"] < 0, f"optim.weight_decay must be >= 0, got {o['weight_decay']}"),
        (not 0 <= t["label_smoothing"] < 1, f"trainer.label_smoothing must be in [0, 1), got {t['label_smoothing']}"),
        (t["grad_clip"] < 0, f"trainer.grad_clip must be >= 0 (0 = off), got {t['grad_clip']}"),
        (t["stop_grace_s"] <= 0, f"trainer.stop_grace_s must be > 0, got {t['stop_grace_s']}"),
        (config["model"]["width"] <= 0, f"model.width must be > 0, got {config['model']['width']}"),
        (d["num_classes"] < 1, f"data.num_classes must be >= 1, got {d['num_classes']}"),
        (len(d["mean"]) != d["in_chans"] or len(d["std"]) != d["in_chans"],
         f"data.mean and data.std need one value per channel (data.in_chans={d['in_chans']})"),
        (d["name"] == "synthetic" and (d["train_size"] < 1 or d["val_size"] < 1),
         "data.train_size and data.val_size must be >= 1 for the synthetic set"),
    ]  # fmt: skip
    for bad, message in problems:
        if bad:
            raise UserError(message)


# The first steps of each process compile kernels (fused CBAM, trainer.compile) and fill the allocator;
# they count in train_s/wall_s but not in train_img_per_s, which is the steady-state rate.
WARMUP_STEPS = 3


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (all of which a checkpoint stores) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients, in one multi-tensor call (``torch.nn.utils.get_total_norm``
    where this torch has it, 2.6 on; the same two foreach reductions before)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients so that their global norm is at most ``max_norm`` (``torch.nn.utils.
    clip_grads_with_norm_`` where this torch has it, 2.6 on)."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))


class NonFiniteError(UserError):
    """The loss or the gradients became NaN or infinite."""


class Trainer:
    """One run. ``stop``: the run's ``StopRequest`` when the caller installed it before building the
    trainer (``train.py``, so that a signal during data loading is handled too); else ``run`` installs one."""

    def __init__(self, config: dict, run_dir: Path, stop: StopRequest | None = None, overrides: list[str] = ()):
        """``overrides``: the Hydra overrides that set this run apart (a single run's command line, a sweep
        job's swept values), shown in TensorBoard's HParams tab."""
        validate(config)
        self.config, self.run_dir, self.overrides = config, Path(run_dir), list(overrides)
        self.t, self.d = config["trainer"], config["data"]
        self.stop = stop or StopRequest(self.t["stop_grace_s"])
        self.device = resolve_device(self.t["device"])
        self.rank, self.world_size = dist.init_from_env(self.device)
        self.main = self.rank == 0
        self.run_dir = Path(dist.broadcast_object(str(self.run_dir)))  # rank 0's folder is the run's
        if not self.main and Path(run_dir) != self.run_dir:
            _remove_if_empty(Path(run_dir))
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.t["batch_size"] % self.world_size:
            raise UserError(
                f"trainer.batch_size={self.t['batch_size']} (the global batch) must be divisible by the "
                f"{self.world_size} processes"
            )
        self.resume_path = self._resume_path(config.get("resume"))
        if self.main:
            self._check_writable()
        if self.t["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        set_cudnn_benchmark(self.device, not self.t["deterministic"])
        seed_everything(config["seed"])

        eval_batch = self.t["eval_batch_size"] or self.t["batch_size"]
        self.train_batches, self.val_batches = build_batches(
            self.d, self.t["batch_size"] // self.world_size, max(1, eval_batch // self.world_size), config["seed"],
            self.device, self.rank, self.world_size,
        )  # fmt: skip
        self.steps_per_epoch = len(self.train_batches)
        if self.t["limit_train_batches"]:
            self.steps_per_epoch = min(self.steps_per_epoch, self.t["limit_train_batches"])
        if self.steps_per_epoch < 1:
            raise UserError(
                f"trainer.batch_size={self.t['batch_size']} is larger than the training set "
                f"({self.train_batches.num_samples} images): no full batch per epoch"
            )

        self.model = build_model(config, pretrained=self.resume_path is None)
        self.params = count_params(self.model)
        self.gmacs = count_gmacs(self.model, (self.d["in_chans"], self.d["image_size"], self.d["image_size"]))
        self.model.to(self.device)
        if self.t["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        if self.world_size > 1 and self.t["sync_bn"]:
            self.model = dist.convert_sync_batchnorm(self.model, self.device)
        self.optimizer = build_optimizer(self.model, config["optim"])
        self.scheduler = build_scheduler(self.optimizer, config["sched"], self.t["epochs"], self.steps_per_epoch)
        self.amp_dtype = amp_dtype(self.t["amp"], self.device)
        set_tf32(self.device, self.t["tf32"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.t["label_smoothing"])

        self.eager_model = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.eager_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.compile_mode = compile_mode(self.t["compile"], self.t["compile_mode"], self.device, self.world_size)
        self.train_model = self.eager_model
        if self.compile_mode is not None:
            try:
                self.train_model = torch.compile(self.eager_model, mode=self.compile_mode)
            except Exception as err:  # as a failure in the first step: eager mode, one warning
                self._compile_failed(err)

        # Progress: where the next step starts, and what has been measured so far.
        self.epoch, self.next_batch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch, self.history = -1.0, -1, []
        self.train_time, self.train_images, self.wall_before = 0.0, 0, 0.0
        self.warmup_time, self.steps_this_run = 0.0, 0
        self.meter_state, self.meter = None, None
        if self.resume_path is not None:
            self._load(self.resume_path)
        self.saved_step = self.global_step  # the step of the newest checkpoint
        self.last_checkpoint = self.resume_path  # the newest checkpoint's file
        self.logger = (
            build_logger(config.get("logger", {}).get("name", "tensorboard"), self.run_dir) if self.main else None
        )
        if self.logger is not None:
            self.logger.charts(CHARTS)

    # ---- setup helpers -------------------------------------------------------------------------
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

    def _load(self, path: Path) -> None:
        ckpt = ckpt_io.load(path)
        ckpt_io.check_same_architecture(ckpt["config"], self.config, path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        p = ckpt["progress"]
        self.epoch, self.next_batch, self.global_step = p["epoch"], p["next_batch"], p["global_step"]
        self.best_top1, self.best_epoch, self.history = p["best_top1"], p["best_epoch"], p["history"]
        self.train_time, self.train_images, self.wall_before = p["train_time"], p["train_images"], p["wall_s"]
        self.meter_state = ckpt.get("meter") if self.main else None  # the ranks' sums: counted once, on rank 0
        ckpt_io.set_rng_state(ckpt["rng"])
        log.info(
            "resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch + 1, self.next_batch, self.global_step
        )

    def _save(self, names: tuple[str, ...], meter: Meter | None, all_ranks: bool = True) -> Path | None:
        """Checkpoint under each of ``names`` (written by rank 0); refuses non-finite weights. A mid-epoch
        checkpoint holds the epoch's meters summed over the ranks (every rank calls this, unless
        ``all_ranks`` is False: then rank 0's alone). Returns the first file's path."""
        meter_sums = None
        if meter is not None:
            meter_sums = dist.all_reduce_sum(meter.sums) if all_ranks else meter.sums
        if not self.main:
            return None
        for pname, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteError(
                    f"parameter {pname} is not finite at step {self.global_step}; no checkpoint written"
                )
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config,
            "progress": {
                "epoch": self.epoch, "next_batch": self.next_batch, "global_step": self.global_step,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "history": self.history,
                "train_time": self.train_time, "train_images": self.train_images,
                "wall_s": self.wall_before + time.time() - self.start_wall,
            },
            "meter": meter_sums.cpu() if meter_sums is not None else None,
            "rng": ckpt_io.rng_state(),
        }  # fmt: skip
        with self.stop.critical():
            for name in names:
                ckpt_io.save_atomic(state, self.ckpt_dir / name)
        self.saved_step, self.last_checkpoint = self.global_step, self.ckpt_dir / names[0]
        return self.last_checkpoint

    # ---- the loop -----------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.t["channels_last"] else x

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, gradients computed; a compiled model that fails to compile or
        run falls back to eager mode, with one warning."""
        try:
            return self._forward_backward_with(self.train_model, x, y)
        except UserError:
            raise
        except Exception as err:
            if self.train_model is self.eager_model:
                raise
            self._compile_failed(err)
            return self._forward_backward_with(self.train_model, x, y)

    def _compile_failed(self, err: Exception) -> None:
        log.warning("torch.compile of the model failed (%s: %s); training continues in eager mode",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")  # fmt: skip
        self.train_model, self.compile_mode = self.eager_model, None

    def _forward_backward_with(self, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compile_mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, self.amp_dtype):
            logits = model(self._inputs(x))
            loss = self.criterion(logits, y)
        # Every rank must agree to stop, or the others would wait forever in the next all-reduce.
        if dist.broadcast_flag(not math.isfinite(loss.item()), self.device):
            raise NonFiniteError(self._nonfinite_message("loss"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def train_step(self, x: torch.Tensor, y: torch.Tensor, meter: Meter) -> None:
        self.scheduler.step_update(self.global_step)
        loss, logits = self._forward_backward(x, y)
        self.scaler.unscale_(self.optimizer)
        # The global norm is needed anyway to catch non-finite gradients; the rescaling pass only with clipping.
        norm = total_grad_norm(self.model.parameters())
        if self.t["grad_clip"]:
            clip_grads_with_norm_(self.model.parameters(), self.t["grad_clip"], norm)
        if not self.scaler.is_enabled() and not math.isfinite(norm.item()):  # gradients are all-reduced
            raise NonFiniteError(self._nonfinite_message("gradient norm"))
        with self.stop.critical():  # the update and its bookkeeping: a late stop waits for them
            self.scaler.step(self.optimizer)
            self.scaler.update()
            meter.update(loss, logits, y)
            self.global_step += 1
            self.next_batch += 1

    def _nonfinite_message(self, what: str) -> str:
        last = self.ckpt_dir / "last.pt"
        where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        return (
            f"the {what} is not finite at step {self.global_step} (epoch {self.epoch + 1}, batch {self.next_batch}); "
            f"stopping without saving. {where}. Fix: lower optim.lr, set trainer.grad_clip, or use trainer.amp=bf16."
        )

    def evaluate(self) -> dict:
        meter = evaluate(self.model, self.val_batches, self.criterion, self.device, self.amp_dtype,
                         self.t["channels_last"], self.t["limit_val_batches"])  # fmt: skip
        return meter.summary(dist.all_reduce_sum(meter.sums))

    def run(self) -> dict | None:
        """Train to ``trainer.epochs``; returns the results, or None when stopped by a signal."""
        self.start_wall = time.time()
        with self.stop:
            try:
                return self._run()
            except StopNow:
                self._stop_overdue()
                return None

    def _stop_overdue(self) -> None:
        """The run did not reach a step's end within the stop's grace period: checkpoint what finished
        (the BatchNorm statistics of an interrupted training forward included)."""
        self.stop.settle()
        if self.global_step > self.saved_step:
            # the ranks may be anywhere now: no collective, rank 0's meters alone
            self._save(("last.pt",), self.meter, all_ranks=False)
        if self.main:
            log.warning("stopped in the middle of work (the step did not end within %g s); %s", self.stop.grace_s,
                        self._saved_state())  # fmt: skip
        dist.cleanup()

    def _saved_state(self) -> str:
        """Where a stopped run's state is, for its last log line."""
        saved = self.last_checkpoint
        return f"checkpoint {saved}; continue with resume={saved}" if saved else "nothing to save"

    def _run(self) -> dict | None:
        fixed_images = next(self.val_batches.batches())[0][:8]
        if self.main and self.t["image_every"] and self.epoch == 0 and self.next_batch == 0:
            log_attention(self.logger, self.model, self._inputs(fixed_images), 0)
        log.info(
            "%s: %s + %s on %s, %.3fM params, %.4f GMACs, %d steps/epoch, device %s x%d; %s",
            self.config["name"], self.config["model"]["arch"], self.config["attention"]["name"], self.d["name"],
            self.params / 1e6, self.gmacs, self.steps_per_epoch, self.device, self.world_size,
            ", ".join(f"{k} {v}" for k, v in self.settings().items()),
        )  # fmt: skip
        while self.epoch < self.t["epochs"]:
            if dist.broadcast_flag(self.stop.requested, self.device):  # arrived during evaluation or start-up
                if self.main:
                    where = self._saved_state()
                    log.warning("stopped at epoch %d, batch %d; %s", self.epoch + 1, self.next_batch, where)
                dist.cleanup()
                return None
            if not self._train_epoch():
                return None
            self._end_epoch(fixed_images)
        results = self._results(self.wall_before + time.time() - self.start_wall)
        if self.main:
            final = (results["top1"], results["top5"], self.params / 1e6, self.gmacs, results["train_img_per_s"])
            write_hparams(self.logger, self.config, dict(zip(METRICS, final, strict=True)), self.overrides)
            self.logger.close()
            _write_json(results, self.run_dir / "results.json")
            log.info("done: top-1 %.2f%%, top-5 %.2f%% (best top-1 %.2f%%); results in %s",
                     results["top1"], results["top5"], results["best_top1"], self.run_dir)  # fmt: skip
        dist.cleanup()
        return results

    def _train_epoch(self) -> bool:
        """One epoch from ``next_batch`` on; False if a stop was requested (checkpoint written)."""
        self.model.train()
        self.epoch_tic = time.perf_counter()
        self.scheduler.step(self.epoch)
        meter = self.meter = Meter(self.device, self.meter_state)
        self.meter_state = None
        bar = tqdm(
            total=self.steps_per_epoch, initial=self.next_batch, desc=f"epoch {self.epoch + 1}/{self.t['epochs']}",
            disable=not (self.main and sys.stderr.isatty()), dynamic_ncols=True, leave=False,
        )  # fmt: skip
        tic, images = time.perf_counter(), 0
        for x, y in self.train_batches.batches(self.epoch, self.next_batch):
            if self.next_batch >= self.steps_per_epoch:
                break
            if self.steps_this_run == 0 and self.compile_mode is not None:
                self._first_compiled_step(x, y, meter)
            else:
                self.train_step(x, y, meter)  # advances global_step and next_batch
            images += x.shape[0] * self.world_size
            self.steps_this_run += 1
            if self.steps_this_run == WARMUP_STEPS:  # leave the warm-up out of the throughput
                self.warmup_time += time.perf_counter() - tic
                tic, images = time.perf_counter(), 0
            if self.global_step % self.t["log_every"] == 0 or self.next_batch == self.steps_per_epoch:
                self._log_progress(meter, bar, images / (time.perf_counter() - tic))
            bar.update(1)
            if self.t["ckpt_every_steps"] and self.global_step % self.t["ckpt_every_steps"] == 0:
                self._account(tic, images)
                tic, images = time.perf_counter(), 0
                self._save(("last.pt",), meter)
            if dist.broadcast_flag(self.stop.requested, self.device) and self.next_batch < self.steps_per_epoch:
                bar.close()
                self._account(tic, images)
                path = self._save(("last.pt",), meter)
                if self.main:
                    log.warning("stopped at epoch %d, batch %d; checkpoint %s. Continue with resume=auto (same "
                                "hydra.run.dir) or resume=%s", self.epoch + 1, self.next_batch, path, path)  # fmt: skip
                dist.cleanup()
                return False
        bar.close()
        self._account(tic, images)
        self.train_summary = meter.summary(dist.all_reduce_sum(meter.sums))
        return True

    def _first_compiled_step(self, x: torch.Tensor, y: torch.Tensor, meter: Meter) -> None:
        """``train_step``, announced: under ``torch.compile`` the model compiles in this process's first
        step, which takes minutes for a large model on a cold cache (inductor keeps its graphs on disk)."""
        if self.main:
            log.info("torch.compile (mode %s): compiling the model in the first training step; with a cold "
                     "inductor cache this can take minutes", self.compile_mode)  # fmt: skip
        tic = time.perf_counter()
        self.train_step(x, y, meter)
        if self.main and self.compile_mode is not None:  # None: compilation failed, eager mode (warned)
            log.info("torch.compile: the first step, compilation included, took %.1f s", time.perf_counter() - tic)

    def _account(self, tic: float, images: int) -> None:
        self.train_time += time.perf_counter() - tic
        self.train_images += images

    def _log_progress(self, meter: Meter, bar: tqdm, img_per_s: float) -> None:
        if not self.main:
            return
        s = meter.summary()
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger.scalar("train/loss_running", s["loss"], self.global_step)  # epoch mean so far
        if bar.disable:
            step_s = self.t["batch_size"] / max(img_per_s, 1e-9)
            epoch_left = self.steps_per_epoch - self.next_batch
            run_left = epoch_left + (self.t["epochs"] - self.epoch - 1) * self.steps_per_epoch  # training steps
            log.info("epoch %d/%d step %d/%d loss %.4f top-1 %.2f%% lr %.4g %.0f img/s eta epoch %.0fs, run %.0fs",
                     self.epoch + 1, self.t["epochs"], self.next_batch, self.steps_per_epoch, s["loss"], s["top1"],
                     lr, img_per_s, epoch_left * step_s, run_left * step_s)  # fmt: skip
        else:
            bar.set_postfix(loss=f"{s['loss']:.4f}", top1=f"{s['top1']:.2f}", img_s=f"{img_per_s:.0f}", lr=f"{lr:.3g}")

    def _end_epoch(self, fixed_images: torch.Tensor) -> None:
        eval_tic = time.perf_counter()
        val = self.evaluate()
        with self.stop.critical():
            self._record_epoch(val, fixed_images, eval_tic)

    def _record_epoch(self, val: dict, fixed_images: torch.Tensor, eval_tic: float) -> None:
        train = self.train_summary
        self.epoch, self.next_batch = self.epoch + 1, 0
        is_best = val["top1"] > self.best_top1
        if is_best:
            self.best_top1, self.best_epoch = val["top1"], self.epoch
        self.history.append({"epoch": self.epoch, "train": train, "val": val,
                             "lr": self.optimizer.param_groups[0]["lr"]})  # fmt: skip
        self._save(("last.pt", "best.pt") if is_best else ("last.pt",), None)
        self.meter = None
        if not self.main:
            return
        logger = self.logger
        for split, s in (("train", train), ("val", val)):
            for k in ("loss", "top1", "top5", "top1_err", "top5_err"):
                logger.scalar(f"{split}/{k}", s[k], self.epoch)
        logger.scalar("lr", self.optimizer.param_groups[0]["lr"], self.epoch)
        logger.scalar("model/params_M", self.params / 1e6, self.epoch)  # series, so that the HParams tab can
        logger.scalar("model/GMACs", self.gmacs, self.epoch)  # compare runs by them
        logger.scalar("throughput/train_img_per_s", self.train_images / max(self.train_time, 1e-9), self.epoch)
        logger.scalar("time/train_s_total", self.train_time, self.epoch)
        if self.t["image_every"] and (self.epoch % self.t["image_every"] == 0 or self.epoch == self.t["epochs"]):
            log_attention(logger, self.model, self._inputs(fixed_images), self.epoch)
        logger.scalar("time/eval_s", time.perf_counter() - eval_tic, self.epoch)
        logger.scalar("time/epoch_s", time.perf_counter() - self.epoch_tic, self.epoch)
        logger.flush()
        log.info("epoch %d/%d: train loss %.4f top-1 %.2f%% | val loss %.4f top-1 %.2f%% top-5 %.2f%%%s",
                 self.epoch, self.t["epochs"], train["loss"], train["top1"], val["loss"], val["top1"], val["top5"],
                 " (best)" if is_best else "")  # fmt: skip

    def settings(self) -> dict:
        """What the ``auto`` settings resolved to on this device (and any fallback since)."""
        impls = {m.impl for m in self.model.modules() if isinstance(m, AttentionModule)}
        fused = any(i == "fused" or (i == "auto" and auto_uses_fused(self.device.type)) for i in impls)
        return {
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
            "tf32": self.t["tf32"] and self.device.type == "cuda",
            "compile": self.compile_mode or "off",
            "attention_impl": ("fused" if fused and self.compile_mode is None else "reference") if impls else "none",
        }

    def _results(self, wall_s: float) -> dict:
        final = self.history[-1]["val"]
        return {
            "status": "finished", "settings": self.settings(),
            "top1": final["top1"], "top5": final["top5"], "top1_err": final["top1_err"], "top5_err": final["top5_err"],
            "val_loss": final["loss"], "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "params": self.params, "gmacs": self.gmacs, "epochs": self.epoch, "steps": self.global_step,
            "wall_s": wall_s, "train_s": self.train_time + self.warmup_time, "warmup_s": self.warmup_time,
            "train_img_per_s": self.train_images / max(self.train_time, 1e-9),
            "history": self.history, "config": self.config,
        }  # fmt: skip


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
