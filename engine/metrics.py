"""Top-k counts, kept as exact integers so that a re-evaluation reproduces them bit for bit."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


class Meter:
    """Sums of loss, top-1 and top-5 hits and sample count, on the device (no per-step sync)."""

    def __init__(self, device, state: torch.Tensor | None = None):
        self.sums = state.to(device) if state is not None else torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, skip: torch.Tensor | None = None):
        """Add a batch; ``skip`` (a bool tensor): leave it out, on the device (a training step whose update
        was skipped, whose NaN loss would make the epoch's mean NaN)."""
        n = target.shape[0]
        correct = topk_correct(logits.detach(), target)
        count = torch.full((), n, dtype=torch.float64, device=self.sums.device)  # a fill, not a host-to-device copy
        batch = torch.stack([loss.detach().double() * n, correct[0].double(), correct[1].double(), count])
        self.sums += batch if skip is None else torch.where(skip, 0.0, batch)

    def summary(self, sums: torch.Tensor | None = None) -> dict:
        loss, c1, c5, n = (sums if sums is not None else self.sums).tolist()
        n = max(n, 1)
        top1, top5 = 100 * c1 / n, 100 * c5 / n
        return {
            "loss": loss / n,
            "top1": top1,
            "top5": top5,
            "top1_err": 100 - top1,
            "top5_err": 100 - top5,
            "samples": int(n),
        }
