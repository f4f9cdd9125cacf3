"""Grad-CAM against the CAM identity, overlays against matplotlib, scripts/visualize.py on real checkpoints."""

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from analysis.gradcam import grad_cam, last_stage
from analysis.overlay import colorize, normalise, overlay, to_unit_range
from helpers import run, script_here, train_here
from models import create_model

TINY_RUN = ["experiment=smoke", "trainer.epochs=1", "data.train_size=64", "data.val_size=32", "trainer.image_every=0"]


def cam_by_hand(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class activation mapping: with global average pooling then a linear layer, y_c = sum_k w_ck mean(A_k) + b_c,
    so dy_c/dA_k = w_ck / (h w) everywhere and Grad-CAM is ReLU(sum_k w_ck A_k) / (h w)."""
    with torch.no_grad():
        activation = model.layer4(
            model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(images)))))))
        )
        weights = model.fc.weight[classes]  # (N, K)
        h, w = activation.shape[-2:]
        return torch.relu(torch.einsum("nk,nkhw->nhw", weights, activation)) / (h * w)


@pytest.mark.parametrize("attention", ["cbam", "se", "none"])
def test_grad_cam_equals_the_cam_identity(attention):
    model = create_model("resnet18", 10, attention, stem="cifar", width=0.25).eval()
    images = torch.randn(4, 3, 32, 32)
    cam = grad_cam(model, images)
    with torch.no_grad():
        logits = model(images)
    assert torch.equal(cam.classes, logits.argmax(dim=1))
    torch.testing.assert_close(cam.scores, logits.softmax(dim=1).max(dim=1).values)
    expected = cam_by_hand(model, images, cam.classes)
    assert expected.amax() > 0  # not a trivially zero map
    torch.testing.assert_close(cam.maps, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_of_mobilenet_and_an_explicit_class():
    model = create_model("mobilenet_v1", 5, "cbam", width=0.25).eval()
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([3, 1])
    cam = grad_cam(model, images, classes=classes)
    with torch.no_grad():
        activation = model.features(images)
        logits = model(images)
    expected = torch.relu(torch.einsum("nk,nkhw->nhw", model.fc.weight[classes], activation)) / activation[0, 0].numel()
    torch.testing.assert_close(cam.maps, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cam.scores, logits.softmax(dim=1)[[0, 1], [3, 1]])
    assert cam.classes.tolist() == [3, 1]


def test_grad_cam_leaves_the_model_as_it_was():
    model = create_model("resnet18", 10, "cbam", stem="cifar", width=0.25).train()
    grad_cam(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.layer4._forward_hooks


def test_a_model_without_a_known_last_stage_is_refused():
    with pytest.raises(ValueError, match="no last stage named layer4 or features"):
        last_stage(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


def test_colorize_is_matplotlibs_colormap():
    levels = torch.arange(256).float() / 255
    rgb = colorize(levels.view(1, 16, 16), "jet")  # (1, 3, 16, 16)
    expected = torch.tensor(colormaps["jet"](np.arange(256))[:, :3], dtype=torch.float32)
    torch.testing.assert_close(rgb[0].permute(1, 2, 0).reshape(256, 3), expected)


def test_each_map_is_normalised_on_its_own_and_drawn_over_its_image():
    maps = torch.stack([torch.arange(16.0).view(4, 4), 100 + 3 * torch.arange(16.0).view(4, 4)])
    scaled = normalise(maps)
    torch.testing.assert_close(scaled[0], scaled[1])
    assert scaled.amin() == 0 and scaled.amax() == 1
    assert torch.equal(normalise(torch.full((1, 3, 3), 7.0)), torch.zeros(1, 3, 3))  # a flat map
    hot = torch.zeros(1, 2, 2)
    hot[0, 0, 0] = 5.0  # top-left quarter hot, the rest cold
    grey = torch.full((1, 1, 8, 8), 0.25)
    blended = overlay(grey, hot, alpha=0.5)
    jet = colormaps["jet"]
    assert blended.shape == (1, 3, 8, 8)
    torch.testing.assert_close(blended[0, :, 0, 0], 0.125 + 0.5 * torch.tensor(jet(255)[:3], dtype=torch.float32))
    torch.testing.assert_close(blended[0, :, 7, 7], 0.125 + 0.5 * torch.tensor(jet(0)[:3], dtype=torch.float32))


def test_to_unit_range_per_image():
    images = torch.stack([torch.linspace(-2, 3, 12).view(1, 2, 2, 3), torch.linspace(5, 6, 12).view(1, 2, 2, 3)])
    shown = to_unit_range(images[:, 0])
    assert shown.shape == (2, 2, 2, 3)
    assert shown.flatten(1).amin(1).tolist() == [0, 0] and shown.flatten(1).amax(1).tolist() == [1, 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two real runs (no attention, CBAM) and three PNG images of the size they were trained on."""
    root = tmp_path_factory.mktemp("vis")
    paths = {}
    for attention in ("none", "cbam"):
        train_here(root / attention, *TINY_RUN, f"attention={attention}")
        paths[attention] = root / attention / "checkpoints" / "last.pt"
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return paths, folder


def visualize(*args):
    """The script in this process: its exit status, stdout and stderr."""
    return script_here("visualize", *args)


def predictions_by_hand(checkpoint, files) -> list[tuple[int, float]]:
    """Each image's predicted class and softmax score, from the checkpoint's weights, PIL and numpy alone."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = ckpt["config"]
    model = create_model(config["model"]["arch"], 10, config["attention"], stem="cifar", width=0.25)
    model.load_state_dict(ckpt["model"])
    data = config["data"]
    size = data["image_size"]
    batch = []
    for file in files:
        image = Image.open(file).convert("RGB").resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255
        batch.append((array - np.array(data["mean"])) / np.array(data["std"]))
    with torch.no_grad():
        probs = model.eval()(torch.tensor(np.stack(batch), dtype=torch.float32).permute(0, 3, 1, 2)).softmax(1)
    return [(int(p.argmax()), float(p.max())) for p in probs]


@pytest.mark.any_torch  # the script's command line and figure
def test_visualize_two_checkpoints_side_by_side(checkpoints, tmp_path):
    """The script as a user runs it (its exit status from the process)."""
    paths, folder = checkpoints
    out = tmp_path / "fig" / "fig4.png"
    args = [paths["none"], paths["cbam"], "--images", folder, "--out", out, "--labels", "plain", "CBAM"]
    proc = run("scripts/visualize.py", *args, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert [(r[0], r[1]) for r in rows] == [(f"img{i}.png", label) for i in range(3) for label in ("plain", "CBAM")]
    files = sorted(folder.glob("*.png"))
    for label, attention in (("plain", "none"), ("CBAM", "cbam")):
        printed = [(int(r[2]), float(r[3])) for r in rows if r[1] == label]  # synthetic classes are named 0..9
        by_hand = predictions_by_hand(paths[attention], files)
        for (cls, score), (cls_hand, score_hand) in zip(printed, by_hand, strict=True):
            assert cls == cls_hand and score == pytest.approx(score_hand, abs=2e-3)
    # columns: input | plain Grad-CAM | CBAM Grad-CAM + one spatial map per resolution (16, 8, 4, 2)
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size == (round(1.9 * 7 * 110), round((2.0 * 3 + 0.6) * 110))
        colours = np.asarray(figure.convert("RGB")).reshape(-1, 3)[::97]
        assert len(set(map(tuple, colours.tolist()))) > 50  # pictures, not a blank page
    assert [p.name for p in out.parent.iterdir()] == ["fig4.png"]


@pytest.mark.any_torch  # the script's command line and figure
def test_visualize_chosen_blocks(checkpoints, tmp_path):
    paths, folder = checkpoints
    out = tmp_path / "one.pdf"
    status, _, stderr = visualize(paths["cbam"], "--images", folder / "img0.png", "--out", out, "--blocks", "layer3.1")
    assert status == 0, stderr
    assert out.read_bytes()[:4] == b"%PDF"


@pytest.mark.any_torch
@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "missing.png"], "is neither an image file nor a folder"),
        (["--images", "{folder}/notes.txt"], "cannot be read as an image"),
        (["--images", "{folder}", "--blocks", "layer9.0"], "no spatial attention in block(s) ['layer9.0']"),
        (["--images", "{folder}", "--labels", "a", "b"], "--labels needs one label per checkpoint (1), got 2"),
        (["--images", "{folder}", "--out", "fig.jpg"], "the figure must be .png, .pdf or .svg"),
    ],
)
def test_visualize_refuses_bad_input(checkpoints, tmp_path, args, message):
    paths, folder = checkpoints
    args = [a.format(folder=folder) for a in args]
    out = ["--out", str(tmp_path / "f.png")] if "--out" not in args else []
    status, _, stderr = visualize(paths["cbam"], *args, *out)
    assert status == 2 and message in stderr, stderr
    assert not (tmp_path / "f.png").exists()


@pytest.mark.any_torch  # the script's command line and figure
def test_visualize_refuses_a_missing_checkpoint(checkpoints, tmp_path):
    _, folder = checkpoints
    status, _, stderr = visualize(tmp_path / "nope.pt", "--images", folder, "--out", tmp_path / "f.png")
    assert status == 2 and "does not exist" in stderr, stderr
