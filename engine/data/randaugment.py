"""RandAugment (Cubuk et al. 2020) as timm configures it (``rand-m6-mstd0.5-inc1``), on the training
device, a whole batch at a time.

timm's ``rand_augment_transform`` decides everything about each image: which ops (``n`` of them), whether
each is applied (probability ``p``), its magnitude (``m``, with Gaussian noise ``mstd``), its sign and its
argument, by timm's own level functions. Here timm's policy object is called per image with its pixel
functions swapped for a recorder, so the draws are timm's; the pixels are then changed on the device,
one batched call per (layer, op) for all the images that drew that op, with per-image arguments.
Written out rather than running timm's PIL ops per image because those run on the CPU, one image at a
time: here in-memory sets stay on the device, and image sets do not spend their CPU workers on it.
What differs from timm's PIL ops: geometric ops resample bilinearly (timm picks bilinear or bicubic at
random; this pins bilinear in timm's hparams, so the draws still match a timm transform configured so),
and where an image meets the fill colour, or PIL rounds through integer tables, pixels may differ by a grey
level or more.

Each batch's draws come from (seed, epoch, batch), for the whole global batch, with Python's and NumPy's
global states put back afterwards: a resumed epoch, and any number of processes, augment each image as
one uninterrupted process does.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms.v2 import functional as TF

Drawn = list[tuple[str, tuple]]  # one image's ops in order, each with its arguments


def timm_policy(config: str, mean: list[float], image_size: int):
    """timm's RandAugment for ``config`` with the hparams timm's ``create_transform`` gives it (fill colour
    the data set's mean pixel, translations up to 0.45 of the image), bilinear resampling pinned."""
    hparams = dict(
        translate_const=int(image_size * 0.45),
        img_mean=tuple(min(255, round(255 * m)) for m in mean),
        interpolation=Image.BILINEAR,
    )
    return rand_augment_transform(config, hparams)


def check_config(config: str) -> str | None:
    """Why ``config`` cannot be used (None: it can): timm cannot parse it, or it names an op that has no
    batched counterpart here."""
    try:
        policy = timm_policy(config, [0.5], 32)
    except (AssertionError, ValueError, KeyError) as exc:
        return "timm cannot parse it" + (f" ({exc})" if str(exc) else "")
    missing = sorted({op.name for op in policy.ops} - set(OPS))
    if missing:
        return f"its ops {', '.join(missing)} have no batched version here (available: {', '.join(OPS)})"
    return None


def _recording(policy):
    """``policy`` with each op's pixel function replaced by one that appends (name, arguments) to the
    list it is given: calling it on ``[]`` returns what timm would have done to an image."""
    ops = []
    for op in policy.ops:
        recorder = type(op).__new__(type(op))
        recorder.__dict__.update(op.__dict__)
        recorder.aug_fn = lambda drawn, *args, _name=op.name, **_kwargs: [*drawn, (_name, args)]
        ops.append(recorder)
    recording = type(policy).__new__(type(policy))
    recording.__dict__.update(policy.__dict__, ops=ops)
    return recording


class BatchRandAugment:
    """``(uint8 images (N, C, H, W), epoch, batch, part) -> augmented``: RandAugment ``config`` (timm's
    string) on the device that holds the images. ``part``: the positions of these images in the global
    batch of ``global_size`` images whose draws are made together."""

    def __init__(self, config: str, mean: list[float], image_size: int, seed: int):
        self.policy = timm_policy(config, mean, image_size)
        self.recording = _recording(self.policy)
        self.fill = list(self.policy.ops[0].kwargs["fillcolor"])  # per channel, where geometric ops leave no pixel
        self.seed = seed

    def draw(self, count: int, epoch: int, batch: int) -> list[Drawn]:
        """The ops timm draws for ``count`` images of batch ``batch`` of ``epoch``."""
        saved = random.getstate(), np.random.get_state()
        state = np.random.SeedSequence([self.seed, epoch, batch]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        try:
            return [self.recording([]) for _ in range(count)]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def __call__(self, x: torch.Tensor, epoch: int, batch: int, part: slice, global_size: int) -> torch.Tensor:
        return apply(x, self.draw(global_size, epoch, batch)[part], self.fill)


def apply(x: torch.Tensor, drawn: list[Drawn], fill: list[float] | None = None) -> torch.Tensor:
    """Each image of ``x`` (uint8, N C H W) changed by its ``drawn`` ops in order: the images whose k-th op
    is the same go through it together. ``fill``: per channel, the colour where geometric ops leave no
    pixel (timm's default: 128)."""
    fill = torch.tensor(fill or [128.0] * x.shape[1], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    layers = max((len(d) for d in drawn), default=0)
    for k in range(layers):
        groups = defaultdict(list)
        for i, ops in enumerate(drawn):
            if k < len(ops):
                groups[ops[k][0]].append(i)
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            # arguments stay on the CPU: the geometric ops build their matrices from them without reading the device
            args = torch.tensor([drawn[i][k][1] for i in rows], dtype=torch.float32).reshape(len(rows), -1)
            x = x.index_copy(0, index, OPS[name](x.index_select(0, index), args, fill))
    return x


def _per_image(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N,) CPU values as (N, 1, 1, 1) on ``device``, copied without waiting for it."""
    return values.view(-1, 1, 1, 1).to(device, non_blocking=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageEnhance`` (``Image.blend``): ``degenerate + factor * (x - degenerate)`` in float32, clipped
    to 0-255 and truncated to uint8."""
    out = degenerate.float() + _per_image(factor, x.device) * (x.float() - degenerate.float())
    return out.clamp(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` (ITU-R 601-2 luma), kept as float, one channel."""
    if x.shape[1] == 1:
        return x.float()
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x.float() * weights).sum(1, keepdim=True)


def _color(x, args, _fill):
    return _blend(_grey(x).round().expand_as(x), x, args[:, 0])


def _contrast(x, args, _fill):
    mean = _grey(x).round().mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
    return _blend(mean.expand_as(x), x, args[:, 0])


def _brightness(x, args, _fill):
    return _blend(torch.zeros_like(x), x, args[:, 0])


def _sharpness(x, args, _fill):
    """PIL's SMOOTH filter as the degenerate image, the border pixels left as they are."""
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    smooth = F.conv2d(x.float(), kernel.expand(c, 1, 3, 3), groups=c).round()
    degenerate = x.float().clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, args[:, 0])


def _posterize(x, args, _fill):
    bits = args[:, 0].long().clamp(0, 8)
    mask = (255 - (2 ** (8 - bits) - 1)).to(torch.uint8)
    return x & _per_image(mask, x.device)


def _solarize(x, args, _fill):
    threshold = _per_image(args[:, 0], x.device)
    return torch.where(x.float() >= threshold, 255 - x, x)


def _solarize_add(x, args, _fill):
    added = (x.float() + _per_image(args[:, 0], x.device)).clamp(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def _affine(x: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE)``: output pixel centre p samples the input at ``A p + t``
    (``matrices``: (N, 2, 3) in pixels), bilinear; outside the image, ``fill``."""
    n, c, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5, indexing="ij"
    )
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = points @ matrices.transpose(1, 2)  # (N, HW, 2) input coordinates in pixels
    grid = torch.stack([source[..., 0] * 2 / w - 1, source[..., 1] * 2 / h - 1], -1).view(n, h, w, 2)
    planes = torch.cat([x.float(), torch.ones(n, 1, h, w, device=x.device)], 1)
    sampled = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = sampled[:, -1:]
    out = sampled[:, :-1] + (1 - inside) * fill + 1e-3  # truncated as PIL's, float32's 99.9999 counting as 100
    return out.clamp(0, 255).to(torch.uint8)


def _matrices(a, b, c, d, e, f, device) -> torch.Tensor:
    """(N, 2, 3) affine matrices [[a, b, c], [d, e, f]] from (N,) CPU tensors or numbers, on ``device``."""
    n = next(v for v in (a, b, c, d, e, f) if isinstance(v, torch.Tensor)).shape[0]
    rows = [v if isinstance(v, torch.Tensor) else torch.full((n,), float(v)) for v in (a, b, c, d, e, f)]
    return torch.stack(rows, 1).view(n, 2, 3).to(device, non_blocking=True)


def _shear_x(x, args, fill):
    return _affine(x, _matrices(1, args[:, 0], 0, 0, 1, 0, x.device), fill)


def _shear_y(x, args, fill):
    return _affine(x, _matrices(1, 0, 0, args[:, 0], 1, 0, x.device), fill)


def _translate_x_rel(x, args, fill):
    return _affine(x, _matrices(1, 0, args[:, 0] * x.shape[-1], 0, 1, 0, x.device), fill)


def _translate_y_rel(x, args, fill):
    return _affine(x, _matrices(1, 0, 0, 0, 1, args[:, 0] * x.shape[-2], x.device), fill)


def _rotate(x, args, fill):
    """PIL's ``rotate(degrees)``: counter-clockwise about the image's centre."""
    cx, cy = x.shape[-1] / 2, x.shape[-2] / 2
    angle = torch.deg2rad(-args[:, 0].double())
    cos, sin = angle.cos().float(), angle.sin().float()
    return _affine(
        x, _matrices(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy, x.device), fill
    )


OPS = {  # timm's op names (its increasing variants among them) -> the batched op, per-image arguments
    "AutoContrast": lambda x, _args, _fill: TF.autocontrast(x),
    "Equalize": lambda x, _args, _fill: TF.equalize(x),
    "Invert": lambda x, _args, _fill: 255 - x,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "PosterizeOriginal": _posterize,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "ColorIncreasing": _color,
    "Contrast": _contrast,
    "ContrastIncreasing": _contrast,
    "Brightness": _brightness,
    "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}
