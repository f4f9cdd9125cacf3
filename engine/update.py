"""The optimizer update of a training step, decided on the device.

A step whose loss or gradients are not finite changes neither the weights, nor the optimizer's state,
nor the normalisation layers' running statistics, and the host does not wait for the device to find
out: the decision is a tensor, as ``GradScaler`` makes it for float16, here for every precision. The
host reads how many steps were skipped when it reads anything else (``skipped``, on logging steps).
"""

from __future__ import annotations

import torch


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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` can skip its update on the device: torch's fused optimizers read a
    ``found_inf`` tensor (the one ``GradScaler`` sets) and leave every weight and state unchanged."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class GuardedUpdate:
    """Unscale (float16), clip (``grad_clip`` > 0), then step the optimizer unless the loss or the
    gradient norm is not finite; the normalisation statistics that the step's forward changed are put
    back when it is not. Where the optimizer cannot skip on the device (a non-fused one), the host
    reads the decision: one synchronisation per step, as before fused optimizers."""

    def __init__(self, model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, grad_clip: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.optimizer, self.scaler, self.grad_clip = optimizer, scaler, grad_clip
        self.on_device = scaler.is_enabled() or skips_on_device(optimizer)
        device = self.params[0].device
        self.saved = torch.empty(sum(b.numel() for b in self.buffers), device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # steps skipped, in all
        self.skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=device)  # up to the last step

    def before_forward(self) -> None:
        """Keep the running statistics that the coming forward will change."""
        if self.buffers:
            torch.cat([b.detach().view(-1).float() for b in self.buffers], out=self.saved)

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """The update after ``loss.backward()``; returns whether it was skipped (a bool tensor)."""
        self.scaler.unscale_(self.optimizer)
        norm = total_grad_norm(self.params)
        if self.grad_clip:
            clip_grads_with_norm_(self.params, self.grad_clip, norm)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if self.scaler.is_enabled():  # float16: the scaler skips non-finite gradients (on the device when fused)
            self.scaler.step(self.optimizer)
        elif self.on_device:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        self.scaler.update()
        self._restore_buffers_if(bad)
        self.skipped += bad
        self.skipped_in_a_row.add_(1).mul_(bad)
        return bad

    def _restore_buffers_if(self, bad: torch.Tensor) -> None:
        if not self.buffers:
            return
        current = torch.cat([b.detach().view(-1).float() for b in self.buffers])
        kept = torch.where(bad, self.saved, current).split([b.numel() for b in self.buffers])
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, [v.view_as(b) for v, b in zip(kept, self.buffers, strict=True)])

    def counts(self) -> tuple[int, int]:
        """(steps skipped in all, in a row up to now), the same on every rank: the gradients that decide
        are all-reduced. Reads the device: call it where the host reads anyway."""
        return int(self.skipped), int(self.skipped_in_a_row)
