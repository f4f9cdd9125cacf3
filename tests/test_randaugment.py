"""RandAugment on the device against timm's RandAugment on PIL images: the same draws, the same pixels."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

from engine.data.randaugment import OPS, BatchRandAugment, apply, timm_policy
from helpers import compose, smooth_picture
from helpers import synthetic_batches as batches

CONFIG = "rand-m6-mstd0.5-inc1"  # ResNet strikes back A3's
FILL = (124, 116, 104)  # ImageNet's mean pixel, timm's fill colour for it
COLOUR_OPS = {
    "AutoContrast": (),
    "Equalize": (),
    "Invert": (),
    "PosterizeIncreasing": (2,),
    "SolarizeIncreasing": (100,),
    "SolarizeAdd": (60,),
    "ColorIncreasing": (1.6,),
    "ContrastIncreasing": (0.4,),
    "BrightnessIncreasing": (1.5,),
    "SharpnessIncreasing": (1.8,),
}
GEOMETRIC_OPS = {
    "Rotate": (17.0,),
    "ShearX": (0.2,),
    "ShearY": (-0.25,),
    "TranslateXRel": (0.2,),
    "TranslateYRel": (-0.3,),
}


def picture(seed: int = 0, height: int = 48, width: int = 64) -> Image.Image:
    return smooth_picture(np.random.default_rng(seed), height, width)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """(1, C, H, W) uint8 of a PIL image."""
    array = np.asarray(image)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)[None]


def ours(name: str, args: tuple, image: Image.Image) -> torch.Tensor:
    fill = torch.tensor(FILL[: len(image.getbands())], dtype=torch.float32).view(1, -1, 1, 1)
    return OPS[name](as_tensor(image), torch.tensor([args], dtype=torch.float32).reshape(1, -1), fill)


def timms(name: str, args: tuple, image: Image.Image) -> torch.Tensor:
    return as_tensor(NAME_TO_OP[name](image, *args, fillcolor=FILL, resample=Image.BILINEAR))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", COLOUR_OPS)
def test_each_colour_op_equals_timms_pil_op(name, mode):
    image = picture().convert(mode)
    difference = (ours(name, COLOUR_OPS[name], image).int() - timms(name, COLOUR_OPS[name], image).int()).abs()
    assert difference.max() <= 1, f"{name}: up to {difference.max()} grey levels from timm's"
    assert difference.float().mean() < 0.1  # PIL rounds through integer lookup tables


@pytest.mark.parametrize("name", GEOMETRIC_OPS)
def test_each_geometric_op_equals_timms_pil_op_inside_the_image(name):
    """Bilinear resampling as PIL's, within a grey level but where the image meets the fill colour (PIL's
    and grid_sample's edges differ)."""
    image = picture()
    difference = (ours(name, GEOMETRIC_OPS[name], image).int() - timms(name, GEOMETRIC_OPS[name], image).int()).abs()
    inner = difference[..., 2:-2, 2:-2]
    assert (inner <= 1).float().mean() > 0.97 and inner.float().mean() < 1, name
    assert difference.float().mean() < 1.5, name


def test_whole_integer_translations_are_exact():
    image = picture()
    for name in ("TranslateXRel", "TranslateYRel"):
        assert torch.equal(ours(name, (0.25,), image), timms(name, (0.25,), image))


def test_the_draws_and_the_pixels_are_timms_randaugment():
    """Python's and NumPy's generators seeded as ``draw`` seeds them, timm's own RandAugment on each PIL
    image gives what ``apply`` does to the batch with the recorded draws; the global states are left as
    they were."""
    augment = BatchRandAugment(CONFIG, [0.485, 0.456, 0.406], 64, seed=7)
    images = [picture(seed) for seed in range(24)]
    random.seed(5)
    np.random.seed(5)
    before = random.getstate(), np.random.get_state()[1].copy()
    drawn = augment.draw(len(images), epoch=2, batch=3)
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert {name for ops in drawn for name, _ in ops} > {"Rotate", "ShearX", "SolarizeAdd", "ColorIncreasing"}
    assert any(len(ops) < 2 for ops in drawn)  # each op applied with probability 1/2

    state = np.random.SeedSequence([7, 2, 3]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    policy = timm_policy(CONFIG, [0.485, 0.456, 0.406], 64)
    theirs = torch.cat([as_tensor(policy(image)) for image in images])
    batch = apply(torch.cat([as_tensor(image) for image in images]), drawn, list(FILL))
    difference = (batch.int() - theirs.int()).abs()
    assert (difference <= 1).float().mean() > 0.98 and difference.float().mean() < 0.5


def test_in_memory_batches_are_augmented_by_seed_epoch_and_batch_whatever_the_world_size():
    plain = list(batches().batches(epoch=1))
    augmented = list(batches(randaugment=CONFIG).batches(epoch=1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, augmented, strict=True))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(plain, augmented, strict=True))
    again = list(batches(randaugment=CONFIG).batches(epoch=1, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented[2:], again, strict=True))
    ranks = [list(batches(2, rank, batch_size=4, randaugment=CONFIG).batches(epoch=1)) for rank in range(2)]
    for whole, first, second in zip(augmented, *ranks, strict=True):
        assert torch.equal(torch.cat([first[0], second[0]]), whole[0])


def test_a_bad_randaugment_string_is_refused_with_what_is_allowed():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="data.randaugment='augmix-m5'.*timm cannot parse it.*Allowed"):
        compose("experiment=smoke", "data.randaugment=augmix-m5")
    with pytest.raises(ConfigError, match="Desaturate, GaussianBlur have no batched version here"):
        compose("experiment=smoke", "data.randaugment=rand-m5-t3a")


def test_image_set_batches_are_augmented_on_the_device_as_the_in_memory_ones(tmp_path):
    """An image folder's training batches: the workers' crops, then ``apply`` with the draws of (seed, epoch,
    batch) for the whole global batch, before normalisation; evaluation batches are left alone."""
    from engine.config import DataConfig
    from engine.data import build_batches
    from helpers import jpeg

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = tmp_path / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(6):
                (folder / f"{i}.JPEG").write_bytes(jpeg(smooth_picture(rng, 50 + 7 * i, 60), quality=90))
    options = dict(name="imagenet", root=str(tmp_path), num_classes=2, image_size=32, workers=0)
    options.update(mean=[0.5] * 3, std=[1 / 255] * 3)  # normalised = pixel - 127.5: the pixels read back exactly
    plain, plain_val = build_batches(DataConfig(**options), 4, 4, seed=5, device="cpu")
    augmented, val = build_batches(DataConfig(**options, randaugment=CONFIG), 4, 4, seed=5, device="cpu")
    augment = BatchRandAugment(CONFIG, [0.5] * 3, 32, seed=5)
    for batch, ((x, y), (xa, ya)) in enumerate(zip(plain.batches(1), augmented.batches(1), strict=True)):
        pixels = (x + 127.5).round().to(torch.uint8)
        expected = apply(pixels, augment.draw(4, 1, batch), augment.fill)
        assert torch.equal(y, ya) and torch.equal((xa + 127.5).round().to(torch.uint8), expected)
        assert not torch.equal(x, xa)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain_val.batches(), val.batches(), strict=True))


def test_augmenting_a_batch_reads_nothing_back_from_the_device():
    """No call that would make the host wait for a CUDA device (``engine.syncs``): the draws and the ops'
    arguments stay on the host, the pixels on the device."""
    from engine.syncs import SyncCounter

    loader = batches(randaugment="rand-m9-n3-mstd0.5-inc1", batch_size=16)
    with SyncCounter(torch.device("cpu")) as counter, counter.counting():
        augmented = list(loader.batches(epoch=0))
    assert counter.calls == [] and len(augmented) == 50 // 16
