"""Checkpoints that are never half-written and refuse to load into the wrong model."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from cbam.errors import UserError


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); a checkpoint is as shareable as any file
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


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


NOT_ARCHITECTURE = ("name", "impl", "drop_rate", "pretrained")  # fields that do not change any tensor's shape


def architecture(config: dict) -> dict:
    """The shape-deciding config entries, flattened: {"model.arch": ..., "attention.pool": ...}."""
    flat = {}
    for keys in ARCH_KEYS:
        node = config
        for k in keys:
            node = node[k]
        if isinstance(node, dict):
            flat.update({f"{keys[0]}.{k}": v for k, v in node.items() if k not in NOT_ARCHITECTURE})
        else:
            flat[".".join(keys)] = node
    return flat


def check_same_architecture(ckpt_config: dict, config: dict, path) -> None:
    """Refuse a checkpoint whose network differs from the configured one, naming the differences."""
    theirs, ours = architecture(ckpt_config), architecture(config)
    diff = [f"{k}={theirs.get(k)!r} (this run: {ours.get(k)!r})" for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)]  # fmt: skip
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
