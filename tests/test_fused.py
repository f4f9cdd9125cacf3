"""Fused CBAM (cbam/fused/) against the reference modules: forward, input and parameter gradients,
BatchNorm running statistics, tied maxima, double-precision gradcheck, bytes saved for backward, and
the compiled kernels. Tests run the fused kernels op by op (conftest) unless they say otherwise."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

from analysis.profile import count_gmacs
from cbam import PRESETS, AttentionSpecError, build_attention
from cbam.fused import compiler, dispatch, function, fused_gated_tail, graphs, passes
from models import create_model
from models.resnet import BasicBlock, Bottleneck

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_VARIANTS = ["se", "channel_max", "channel", "spatial", "cbam", "cbam_spatial_first", "cbam_parallel"]


def _attention(name: str, channels: int, impl: str) -> nn.Module:
    spec = dataclasses.replace(PRESETS[name], reduction=4, kernel_size=3, spatial_bn_zero_init=False)
    return build_attention(channels, dataclasses.replace(spec, impl=impl))


def _pair(name: str, channels: int = 16):
    """(reference, fused) attention modules with equal weights; two channels made twins (same MLP
    output row) so that maxima over channels tie."""
    ref = _attention(name, channels, "reference")
    for mlp in [m for m in ref.modules() if isinstance(m, nn.Sequential)]:
        with torch.no_grad():
            mlp[2].weight[1] = mlp[2].weight[0]
            mlp[2].bias[1] = mlp[2].bias[0]
    fus = _attention(name, channels, "fused")
    fus.load_state_dict(ref.state_dict())
    return ref, fus


def _bn(channels: int, ties: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[2] = -0.7  # a negative gamma: MaxPool of F comes from the minimum of x
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        if not ties:
            return bn
        bn.weight[3] = 0.0  # zero gamma (zero-init residual): F is constant, every position ties
        bn.weight[1] = bn.weight[0]  # twins of the MLP rows above
        bn.bias[0] = bn.bias[1] = 1.5  # the twins are often the largest channel: ties over channels
    return bn


def _tied_input(n=3, c=16, h=6, w=5, dtype=torch.float32):
    """x with tied maxima: two positions share each (n, c) maximum and minimum, channels 0 and 1 are equal."""
    x = torch.randn(n, c, h, w, dtype=dtype)
    x[:, 1] = x[:, 0]
    top, bottom = x.amax(dim=(2, 3)) + 1, x.amin(dim=(2, 3)) - 1
    x[:, :, 0, 0] = x[:, :, 2, 3] = top
    x[:, :, 1, 1] = x[:, :, 4, 2] = bottom
    return x


def _run(fn, params, *inputs, grad):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs], [p.grad.clone() for p in params]


def _assert_close(actual, expected, what, tol=1e-5):
    """|a - b| <= tol * max(1, |b|_max): 1e-5 absolute for values of order one, relative for sums."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max |fused - reference| = {err:.3g} (scale {scale:.3g})"


def _compare(ref_out, fus_out, names):
    (y_r, gi_r, gp_r), (y_f, gi_f, gp_f) = ref_out, fus_out
    _assert_close(y_f, y_r, "output")
    for i, (a, b) in enumerate(zip(gi_f, gi_r, strict=True)):
        _assert_close(a, b, f"input {i} gradient")
    for name, a, b in zip(names, gp_f, gp_r, strict=True):
        _assert_close(a, b, f"{name} gradient")


def _check_tail(
    name: str, training: bool, memory_format=torch.contiguous_format, offset: float = 0.0, device: str = "cpu"
) -> None:
    """relu(attention(BN(x)) + shortcut), fused against reference: output, gradients, buffers.
    ``offset`` shifts x away from the BN's running mean."""
    ref, fus = (m.to(device) for m in _pair(name))
    bn_r = _bn(16).to(device)
    bn_f = copy.deepcopy(bn_r)
    for m in (ref, fus, bn_r, bn_f):
        m.train(training)
    x = (_tied_input() + offset).to(device).contiguous(memory_format=memory_format)
    sc = torch.randn(3, 16, 6, 5).to(device).contiguous(memory_format=memory_format)
    dy = torch.randn(3, 16, 6, 5).to(device)
    params_r = [*bn_r.parameters(), *ref.parameters()]
    params_f = [*bn_f.parameters(), *fus.parameters()]
    out_r = _run(lambda x, s: torch.relu(ref(bn_r(x)) + s), params_r, x, sc, grad=dy)
    out_f = _run(lambda x, s: fus.forward_tail(x, bn_f, s), params_f, x, sc, grad=dy)
    names = [f"bn.{n}" for n, _ in bn_r.named_parameters()] + [n for n, _ in ref.named_parameters()]
    _compare(out_r, out_f, names)
    for (bname, a), b in zip(bn_r.named_buffers(), bn_f.buffers(), strict=True):
        _assert_close(b.float(), a.float(), f"BatchNorm buffer {bname}")
    for (bname, a), b in zip(ref.named_buffers(), fus.buffers(), strict=True):
        _assert_close(b.float(), a.float(), f"attention buffer {bname}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FUSED_VARIANTS)
def test_block_tail_matches_reference(name, training):
    """The tail of a residual block, fused in one Function, on inputs with tied maxima."""
    _check_tail(name, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["cbam", "cbam_parallel", "se"])
def test_block_tail_far_from_bn_mean(name, training):
    """x centred at 20 (running mean about 0): backward's per-(n, c) sums are taken around the BN's mean,
    and dL/da = sum (g * b + dv) * F is rebuilt from them; no cancellation beyond float32 rounding."""
    _check_tail(name, training, offset=20.0)


@pytest.mark.parametrize("name", FUSED_VARIANTS)
def test_standalone_module_matches_reference(name):
    """Without BN and shortcut (placement pre/post, or the module used on its own), on tied inputs."""
    ref, fus = _pair(name)
    x, dy = _tied_input(), torch.randn(3, 16, 6, 5)
    out_r = _run(ref, list(ref.parameters()), x, grad=dy)
    out_f = _run(fus, list(fus.parameters()), x, grad=dy)
    _compare(out_r, out_f, [n for n, _ in ref.named_parameters()])


def _check_inference(name: str, memory_format, device: str = "cpu") -> None:
    """Evaluation without gradients (the forward graph keeping nothing) against the reference."""
    ref, fus = (m.to(device).eval() for m in _pair(name))
    bn = _bn(16).to(device).eval()
    x = _tied_input().to(device).contiguous(memory_format=memory_format)
    sc = torch.randn(3, 16, 6, 5).to(device).contiguous(memory_format=memory_format)
    with torch.no_grad():
        y_f = fus.forward_tail(x, bn, sc)
        y_r = torch.relu(ref(bn(x)) + sc)
        alone_f, alone_r = fus(x), ref(x)  # placement pre/post: no BN, no shortcut
        x_reused = x.clone()
        y_in_x = fus.forward_tail(x_reused, bn, sc, producer=torch.nn.Identity())
    assert not y_f.requires_grad
    _assert_close(y_f, y_r, "inference output")
    assert y_in_x.data_ptr() == x_reused.data_ptr()
    _assert_close(y_in_x, y_r, "inference output written into x")
    _assert_close(alone_f, alone_r, "inference output without BN and shortcut")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", FUSED_VARIANTS)
def test_inference_without_grad_matches_and_builds_no_graph(name, memory_format):
    """channels_last 6x5 maps take the tiled channel pooling (tiles of 6 rows)."""
    _check_inference(name, memory_format)


def test_hooks_send_the_tail_to_the_reference(monkeypatch, caplog):
    """The fused graphs call neither the gates' modules nor the BN: where a forward hook watches one of
    them (TensorBoard's attention images, a profiler's global hooks), the reference runs instead, and the
    log says why, once."""
    _, fus = _pair("cbam")
    bn, x, sc = _bn(16), torch.randn(3, 16, 6, 5), torch.randn(3, 16, 6, 5)
    calls, original = [], function.FusedGatedTail.apply
    monkeypatch.setattr(function.FusedGatedTail, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(dispatch, "_said", set())
    fus(x)
    assert calls == [1]
    with caplog.at_level(logging.INFO, logger="cbam.fused.dispatch"):
        handle = fus.channel_gate.gate.register_forward_hook(lambda *args: None)
        fus(x)
        handle.remove()
        with nn.modules.module.register_module_forward_hook(lambda *args: None):
            fus(x)
    assert calls == [1]
    assert caplog.messages == ["CBAM: the reference implementation runs (forward hooks watch it)"]
    fus(x)
    assert calls == [1, 1]
    seen = []
    with bn.register_forward_hook(lambda *args: seen.append(1)):
        fus.forward_tail(x, bn, sc)
    assert seen == [1] and calls == [1, 1, 1]  # the BN ran as a module, then the gates alone, fused


def test_batch_statistics_without_gradients_update_running_ones():
    """BatchNorms in training mode under no_grad (a forward to calibrate statistics, say): same output
    and running statistics as the reference, from one graph that keeps nothing for backward."""
    ref, fus = _pair("cbam")
    bn_r = _bn(16).train()
    bn_f = copy.deepcopy(bn_r)
    x, sc = _tied_input(), torch.randn(3, 16, 6, 5)
    with torch.no_grad():
        y_f, y_r = fus.forward_tail(x, bn_f, sc), torch.relu(ref(bn_r(x)) + sc)
    _assert_close(y_f, y_r, "output")
    expected, actual = [*bn_r.named_buffers(), *ref.named_buffers()], [*bn_f.buffers(), *fus.buffers()]
    for (name, a), b in zip(expected, actual, strict=True):
        _assert_close(b.float(), a.float(), f"buffer {name}")


def test_hw_tiles_reduce_like_one_step():
    x = torch.randn(2, 5, 14, 12).contiguous(memory_format=torch.channels_last)
    tile = passes._hw_tile(x)
    assert tile == 7 and passes._hw_tile(x.contiguous()) == 1
    for op in (torch.sum, torch.amax, torch.amin):
        torch.testing.assert_close(passes._reduce_hw(x, op, tile), op(x, dim=(2, 3)))


def test_frozen_attention_parameters():
    """Gates whose parameters do not require grad (fine-tuning the rest) still pass gradients through."""
    ref, fus = _pair("cbam")
    for p in [*ref.parameters(), *fus.parameters()]:
        p.requires_grad_(False)
    x, dy = _tied_input(), torch.randn(3, 16, 6, 5)
    (y_r, (gx_r,), _), (y_f, (gx_f,), _) = _run(ref, [], x, grad=dy), _run(fus, [], x, grad=dy)
    _assert_close(y_f, y_r, "output")
    _assert_close(gx_f, gx_r, "input gradient")
    assert all(p.grad is None for p in fus.parameters())


def test_tied_inputs_really_tie():
    """The tie construction above produces ties of both reductions (else the tests prove less)."""
    ref, _ = _pair("cbam_parallel")
    f = _bn(16).train()(_tied_input())
    over_hw = (f == f.amax(dim=(2, 3), keepdim=True)).sum(dim=(2, 3))
    over_c = (f == f.amax(dim=1, keepdim=True)).sum(dim=1)
    assert (over_hw >= 2).all() and (over_hw[:, 3] == 30).all()  # zero gamma: all 30 positions tie
    assert (over_c >= 2).sum() > 0


@pytest.mark.parametrize("arch,block", [("resnet18", BasicBlock), ("resnet50", Bottleneck)])
@pytest.mark.parametrize("name", ["cbam", "cbam_spatial_first", "se"])
def test_whole_network_matches_reference(arch, block, name):
    """A whole ResNet, fused blocks versus reference blocks: logits, every parameter gradient.

    In float64: through a deep float32 network the two implementations' ulp-level differences move
    some ReLU pre-activations across zero, which changes gradients by far more than 1e-5 for either
    implementation (the block-level tests above compare float32 on identical inputs)."""
    kw = dict(num_classes=10, stem="cifar", width=0.25)
    ref = create_model(arch, attention={"preset": name, "impl": "reference"}, **kw).double()
    fus = create_model(arch, attention={"preset": name, "impl": "fused"}, **kw).double()
    fus.load_state_dict(ref.state_dict())
    assert any(isinstance(m, block) for m in fus.modules())
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.double), torch.randint(0, 10, (4,))
    logits = {}
    for key, model in (("ref", ref), ("fus", fus)):
        logits[key] = model(x)
        nn.functional.cross_entropy(logits[key], y).backward()
    _assert_close(logits["fus"].detach(), logits["ref"].detach(), "logits", tol=1e-10)
    for (n, p_r), p_f in zip(ref.named_parameters(), fus.parameters(), strict=True):
        _assert_close(p_f.grad, p_r.grad, n, tol=1e-10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_evaluation_reuses_the_conv_output_unless_a_hook_sees_it(arch):
    """In evaluation a block's tail writes its output into the conv output (a temporary of the block);
    not when a forward hook on that conv may have kept the tensor, whose values must then stay."""
    kw = dict(num_classes=10, stem="cifar", width=0.25)
    ref = create_model(arch, attention={"preset": "cbam", "impl": "reference"}, **kw).eval()
    fus = create_model(arch, attention={"preset": "cbam", "impl": "fused"}, **kw).eval()
    fus.load_state_dict(ref.state_dict())
    block = fus.layer2[0]
    conv = block.conv3 if hasattr(block, "conv3") else block.conv2
    conv_outputs = []
    conv_forward = conv.forward  # wrapped as an attribute, not a hook: hooks turn the reuse off
    conv.forward = lambda inp: conv_outputs.append(conv_forward(inp)) or conv_outputs[-1]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_close(fus(images), ref(images), "logits with the conv outputs overwritten")
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        out = block(x)
        assert out.data_ptr() == conv_outputs[-1].data_ptr()
        kept = []
        handle = conv.register_forward_hook(lambda mod, inp, output: kept.append((output, output.clone())))
        out = block(x)
        handle.remove()
    ((seen, copy_at_hook),) = kept
    assert torch.equal(seen, copy_at_hook), "the fused tail overwrote a conv output that a hook kept"
    assert out.data_ptr() != seen.data_ptr()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FUSED_VARIANTS)
def test_gradcheck_double(name, training):
    """Double-precision gradcheck of the fused Function w.r.t. x, the shortcut and every parameter
    (away from ties, where max pooling has no derivative)."""
    gate = _attention(name, 8, "fused")
    bn = _bn(8, ties=False)
    gate, bn = gate.double().train(training), bn.double().train(training)
    x = torch.randn(2, 8, 4, 3, dtype=torch.double, requires_grad=True)
    sc = torch.randn(2, 8, 4, 3, dtype=torch.double, requires_grad=True)
    params = [*bn.parameters(), *gate.parameters()]
    names = [f"bn.{n}" for n, _ in bn.named_parameters()] + [n for n, _ in gate.named_parameters()]

    def fn(x, sc, *ps):
        with (
            torch.nn.utils.stateless._reparametrize_module(
                bn, dict(zip([n for n, _ in bn.named_parameters()], ps[:2], strict=True))
            ),
            torch.nn.utils.stateless._reparametrize_module(
                gate, dict(zip([n for n, _ in gate.named_parameters()], ps[2:], strict=True))
            ),
        ):
            return fused_gated_tail(gate.fused_plan(bn), x, sc)

    assert len(names) == len(params)
    assert torch.autograd.gradcheck(fn, (x, sc, *[p.detach().requires_grad_() for p in params]))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_fused_saves_what_the_block_without_attention_saves():
    """Backward keeps x and y (which the block keeps anyway) and small tensors only."""
    x = torch.randn(4, 256, 14, 14)
    sizes = {}
    for impl in ("none", "fused", "reference"):
        torch.manual_seed(0)
        attention = "none" if impl == "none" else {"preset": "cbam", "impl": impl}
        block = Bottleneck(256, 64, attention=create_model("resnet50", attention=attention).attention).train()
        sizes[impl] = _saved_bytes(block, x)
    small = 4 * 256 * 4 * 8 + 4 * 14 * 14 * 4 * 8  # a few (N, C) and (N, H, W) float32 tensors
    assert sizes["fused"] <= sizes["none"] + small, sizes
    assert sizes["reference"] > 1.3 * sizes["none"], sizes  # what fusion saves, for scale


def test_gate_hooks_fire_once_with_the_reference_values():
    """TensorBoard's attention images hook the ``.gate`` modules: with a hook there the module runs the
    reference (``test_hooks_send_the_tail_to_the_reference``), which calls each once per forward."""
    ref, fus = _pair("cbam")
    seen = {"ref": [], "fus": []}
    for key, m in (("ref", ref), ("fus", fus)):
        for gate in (m.channel_gate.gate, m.spatial_gate.gate):
            gate.register_forward_hook(lambda mod, i, o, key=key: seen[key].append(o.detach()))
    x = torch.randn(3, 16, 6, 5, requires_grad=True)
    ref(x).sum().backward()
    fus(x).sum().backward()
    assert len(seen["fus"]) == len(seen["ref"]) == 2
    for a, b in zip(seen["fus"], seen["ref"], strict=True):
        _assert_close(a, b, "gate output")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
def test_bf16_autocast_close_to_reference(device, monkeypatch):
    """Under bf16 autocast (trainer.amp=bf16); on CUDA with the kernels compiled by inductor (Triton)."""
    if device == "cuda":
        monkeypatch.setattr(compiler, "KERNEL_MODE", "compiled")
    ref, fus = (m.to(device) for m in _pair("cbam"))
    bn = _bn(16).to(device).train()
    x, sc = (torch.randn(3, 16, 6, 5).to(device).bfloat16() for _ in range(2))
    with torch.autocast(device, dtype=torch.bfloat16):
        y_f = fus.forward_tail(x, copy.deepcopy(bn), sc)
        y_r = torch.relu(ref(copy.deepcopy(bn)(x)) + sc)
    assert y_f.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_r.float(), atol=0.05, rtol=0.02)
    for m in (ref, fus, bn):
        m.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):  # evaluation: the one-graph path
        y_f, y_r = fus.forward_tail(x, bn, sc), torch.relu(ref(bn(x)) + sc)
    assert y_f.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_r.float(), atol=0.05, rtol=0.02)


def test_unsupported_variants():
    """impl=fused is refused where the fused Function does not implement the variant; impl=auto falls
    back to the reference there."""
    for spec in ({"preset": "cbam_conv1x1_k3"}, {"preset": "cbam_parallel", "parallel_combine": "add"}):
        with pytest.raises(AttentionSpecError, match="impl=fused supports"):
            build_attention(16, {**spec, "impl": "fused"})
        assert build_attention(16, {**spec, "impl": "auto"}).impl == "reference"
    assert build_attention(16, "cbam").impl == "auto"


def test_whole_model_compile_uses_reference_inside():
    """Under torch.compile of a whole model the fused Function steps aside (inductor fuses the reference)."""
    m = build_attention(16, {"preset": "cbam", "impl": "fused"})
    calls = []
    original = function.FusedGatedTail.apply
    function.FusedGatedTail.apply = lambda *a: calls.append(1) or original(*a)
    try:
        x = torch.randn(2, 16, 4, 4)
        m(x)
        assert calls == [1]
        torch.compile(m, backend="eager")(x)
        assert calls == [1]
    finally:
        function.FusedGatedTail.apply = original


@pytest.mark.slow
@pytest.mark.skipif(not compiler.toolchain_available("cpu"), reason="inductor needs a C++ compiler on CPU")
@pytest.mark.parametrize("name", ["cbam", "cbam_spatial_first"])
def test_compiled_kernels_match_reference(name, monkeypatch):
    """The same comparison with the kernels compiled by inductor (C++): training, evaluation with
    gradients (the Function) and without (one graph)."""
    monkeypatch.setattr(compiler, "KERNEL_MODE", "compiled")
    # The trainer counts GMACs under FlopCounterMode first: that runs eagerly and must not disable compilation.
    count_gmacs(build_attention(16, {"preset": name, "impl": "fused"}), (16, 6, 5))
    for training in (True, False):
        _check_tail(name, training, torch.channels_last)
    _check_inference(name, torch.channels_last)
    tail_graphs = (graphs.tail_forward, graphs.tail_backward)
    assert all(graph.compiled is not None and not graph.failed for graph in tail_graphs)


@contextlib.contextmanager
def _without_tf32():
    """Full float32 convs and matmuls on CUDA (cuDNN's convs default to TF32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or not compiler.toolchain_available("cuda"), reason="needs a CUDA GPU and Triton"
)
@pytest.mark.parametrize("name", ["cbam", "cbam_spatial_first"])
def test_triton_kernels_match_reference(name, monkeypatch):
    """On CUDA, the kernels compiled by inductor (Triton) against the reference in float32 (TF32 off, or
    the reference's own convs and matmuls would be the less exact side): training, evaluation with
    gradients and without, channels_last."""
    monkeypatch.setattr(compiler, "KERNEL_MODE", "compiled")
    with _without_tf32():
        for training in (True, False):
            _check_tail(name, training, torch.channels_last, device="cuda")
        _check_inference(name, torch.channels_last, device="cuda")
    tail_graphs = (graphs.tail_forward, graphs.tail_backward)
    assert all(graph.compiled is not None and not graph.failed for graph in tail_graphs)
