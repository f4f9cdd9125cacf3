"""Checkpoints that are never half-written and refuse to load into the wrong model."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from cbam.errors import UserError

from .files import umask


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit this run."""


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` so that ``path`` always holds either the old or the new file.

    Temporary file in the same directory, flushed and fsynced, then renamed over ``path``; on any
    error (a full disk, say) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private (0600); a checkpoint is as shareable as any file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError
            raise CheckpointError(
                f"could not write checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the previous "
                "checkpoint there, if any, is unchanged. Fix: free disk space or choose another paths.log_dir."
            ) from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class NonFiniteWeights(CheckpointError):
    """A checkpoint would hold NaN or infinite weights: refused, the previous one stays."""


def save_run(state: dict, paths: list[Path], step: int) -> None:
    """A run's state (``state["model"]`` its weights) under each of ``paths``, atomically; refuses
    non-finite weights, so that a checkpoint always holds a model worth resuming."""
    for name, tensor in state["model"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeights(f"parameter {name} is not finite at step {step}; no checkpoint written")
    for path in paths:
        save_atomic(state, path)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, keeping how this optimizer was built to run (fused, foreach): a
    checkpoint stores those flags with the hyper-parameters, and they belong to the device, not the run."""
    flags = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)


def load(path: str | Path) -> dict:
    """Load a checkpoint written by ``save_atomic``; a clear ``CheckpointError`` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read ({type(exc).__name__}). "
            "Fix: resume from another checkpoint (best.pt, or an earlier run), or start afresh with resume=null."
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint of this project (no model/config entries)")
    return ckpt


# The parts of the config that decide the network's shape.
ARCH_KEYS = (("model",), ("attention",), ("data", "num_classes"), ("data", "in_chans"))


# fields that do not change any tensor's shape
NOT_ARCHITECTURE = ("name", "impl", "drop_rate", "drop_path_rate", "pretrained")


def architecture(config: dict) -> dict:
    """The shape-deciding config entries, flattened: {"model.arch": ..., "attention.pool": ...}."""
    # what checkpoints from before each option had
    flat = {"model.blurpool": False, "attention.module": "cbam"}
    for keys in ARCH_KEYS:
        node = config
        for k in keys:
            node = node[k]
        if isinstance(node, dict):
            flat.update({f"{keys[0]}.{k}": v for k, v in node.items() if k not in NOT_ARCHITECTURE})
        else:
            flat[".".join(keys)] = node
    return flat


def weights(ckpt: dict, path, ema: bool = False) -> dict:
    """A checkpoint's trained weights, or the EMA of them (``ema``; refused, with the fix, if the run kept none)."""
    if not ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no EMA of the weights (its run had trainer.ema_decay=0). Fix: leave "
            "out the EMA option to use the trained weights, or train with trainer.ema_decay=0.9998 (say)."
        )
    return ckpt["ema"]


def check_same_architecture(ckpt_config: dict, config: dict, path) -> None:
    """Refuse a checkpoint whose network differs from the configured one, naming the differences."""
    theirs, ours = architecture(ckpt_config), architecture(config)
    diff = [
        f"{k}={theirs.get(k)!r} (this run: {ours.get(k)!r})"
        for k in sorted(set(theirs) | set(ours))
        if theirs.get(k) != ours.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds another architecture: {'; '.join(diff)}. Fix: pass the same "
            "model/attention/data options as the run that wrote it, or start afresh with resume=null."
        )


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # int64: torch before 2.5 cannot pickle a uint32 tensor
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
