"""Distributed data parallel: process-group setup from torchrun's or SLURM's environment, and metric reduction."""

from __future__ import annotations

import os
import re
import subprocess

import torch
import torch.distributed as dist


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[07-09,12],cpu1" -> "gpu07" (what ``scontrol show
    hostnames`` prints first; written here because no scontrol runs outside a SLURM cluster)."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM host list {nodelist!r}")
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def slurm_to_torchrun_env(environ=os.environ) -> bool:
    """In a task that ``srun`` started (SLURM_PROCID set, no torchrun), set torchrun's variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, multi-node included: the
    rendezvous is the job's first host (or MASTER_ADDR if set), the port MASTER_PORT or one derived
    from the job id. Returns whether it did."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    environ["RANK"], environ["WORLD_SIZE"] = environ["SLURM_PROCID"], environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = first_host(environ.get("SLURM_JOB_NODELIST") or environ["SLURM_NODELIST"])
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


_control_group = None  # where the ranks exchange flags: gloo, on the CPU


def init_from_env(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by ``torchrun`` (even as its only process) or
    as several SLURM tasks."""
    global _control_group
    slurm_to_torchrun_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's runs are DDP, of one process too
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return dist.get_rank(), world_size


def agree(flag: bool, interval: int) -> tuple[bool, int]:
    """(True if ``flag`` is on any rank, the smallest ``interval`` of all ranks), the same on every rank: one
    all-reduce of two integers over the CPU (gloo), which waits for no device. Every rank must call it at
    the same point of the run."""
    if not dist.is_initialized():
        return flag, interval
    values = torch.tensor([int(flag), -interval])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(values[0]), int(-values[1])


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def global_rank() -> int:
    """This process's rank from torchrun's or SLURM's environment, before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (after a preemption signal and its checkpoint); False when not
    under SLURM or when scontrol refuses."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor of counts over all ranks (identity in a single process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. its run directory)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


class AllReduceBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose batch statistics cover every process, for CPU (gloo) runs.

    PyTorch's ``SyncBatchNorm`` runs on GPUs only; this computes the per-channel sum and sum of
    squares locally, sums them across ranks with a differentiable all-reduce, and normalises with the
    global mean and (biased) variance, updating the running stats as ``BatchNorm2d`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        c = x.shape[1]
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        stats = torch.distributed.nn.functional.all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm2d synchronised across ranks: PyTorch's SyncBatchNorm on CUDA, ours on CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(child.weight.device))
        else:
            convert_sync_batchnorm(child, device)
    return module
