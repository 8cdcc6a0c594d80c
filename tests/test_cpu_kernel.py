"""The compiled CPU kernel of routed attention against the reference math, plus its fallbacks."""

import contextlib
import logging
import platform

import pytest
import torch

from yoloattn import BiLevelRoutingAttention
from yoloattn.nn import backend as backend_module
from yoloattn.nn.functional import cpu_kernel, routed_attention, routed_attention_reference

pytestmark = pytest.mark.skipif(cpu_kernel.unavailable_reason() is not None,
                                reason=f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")

# (n, p, lq, lkv, topk, heads, qk_dim, v_dim): the specialised head sizes 8/16/32 and generic ones
# (4, 12, 6 vs 10), token counts that are and are not multiples of the 16 vector lanes, topk = p, batch > 1
CASES = [
    (1, 49, 144, 144, 4, 8, 64, 64),  # YOLOv8n P3 at 640
    (2, 9, 13, 13, 3, 2, 16, 16),
    (2, 4, 5, 16, 2, 4, 64, 32),  # qk head 16, v head 8: generic loops
    (1, 4, 20, 20, 4, 1, 8, 8),  # topk = p
    (2, 16, 36, 9, 5, 4, 128, 128),  # pooled keys (Lkv < Lq), head 32
    (3, 4, 17, 33, 2, 2, 12, 20),
    (1, 1, 1, 1, 1, 1, 4, 4),
]


def _inputs(n, p, lq, lkv, topk, heads, qk_dim, v_dim, dtype=torch.float32, strided=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # q and kv as column slices of wider tensors, like the outputs of the qkv projection
        q = torch.randn(n, p, lq, qk_dim + 7, generator=g, dtype=dtype)[..., 3:3 + qk_dim]
        kv = torch.randn(n, p, lkv, qk_dim + v_dim + 5, generator=g, dtype=dtype)[..., :qk_dim + v_dim]
    else:
        q = torch.randn(n, p, lq, qk_dim, generator=g, dtype=dtype)
        kv = torch.randn(n, p, lkv, qk_dim + v_dim, generator=g, dtype=dtype)
    r_idx = torch.stack([torch.randperm(p, generator=g)[:topk] for _ in range(n * p)]).view(n, p, topk)
    return q.requires_grad_(), kv.requires_grad_(), r_idx


def _out_and_grads(fn, q, kv, seed=1):
    out = fn(q, kv)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out.detach(), *torch.autograd.grad((out * weight).sum(), (q, kv)))


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference(case, strided):
    q, kv, r_idx = _inputs(*case, strided=strided)
    heads, qk_dim = case[5], case[6]
    kw = dict(num_heads=heads, qk_dim=qk_dim, scale=qk_dim**-0.5)
    kernel = _out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    ref = _out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q, kv)
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 ISA levels")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_kernel_without_avx512_matches_reference(march, monkeypatch):
    """Machines without AVX-512 (AVX2, or plain SSE2) compile the portable exp2 and narrower vectors."""
    lib = cpu_kernel._build_library(march)
    if isinstance(lib, str):
        pytest.skip(lib)
    monkeypatch.setattr(cpu_kernel, "_library", lambda: lib)
    # magnitude 12: logits past the one-pass bound, so the max-subtracting path with its clamped exp2
    for case, magnitude in ((CASES[0], 1.0), (CASES[2], 1.0), (CASES[5], 1.0), (CASES[5], 12.0)):
        q, kv, r_idx = _inputs(*case)
        with torch.no_grad():
            q *= magnitude
            kv[..., :case[6]] *= magnitude
        kw = dict(num_heads=case[5], qk_dim=case[6], scale=case[6] ** -0.5)
        kernel = _out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
        ref = _out_and_grads(lambda q, kv: routed_attention_reference(q.double(), kv.double(), r_idx, **kw)[0], q, kv)
        for a, b in zip(kernel, ref):
            torch.testing.assert_close(a, b.float(), atol=1e-5 * magnitude**2, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: "-".join(map(str, c)))
def test_kernel_against_float64(case):
    """The fp32 kernel's outputs and gradients against float64 autograd of the reference math."""
    q, kv, r_idx = _inputs(*case, strided=False)
    heads, qk_dim = case[5], case[6]
    kw = dict(num_heads=heads, qk_dim=qk_dim, scale=qk_dim**-0.5)
    kernel = _out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    q64, kv64 = (t.detach().double().requires_grad_() for t in (q, kv))
    ref = _out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q64, kv64)
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-6, rtol=1e-5)


def test_only_requested_gradients():
    q, kv, r_idx = _inputs(*CASES[1])
    kw = dict(num_heads=2, qk_dim=16, scale=0.25)
    ref_dq, ref_dkv = torch.autograd.grad(routed_attention_reference(q, kv, r_idx, **kw)[0].sum(), (q, kv))
    (dq,) = torch.autograd.grad(cpu_kernel.routed_attention_cpu(q, kv.detach(), r_idx, **kw).sum(), (q,))
    (dkv,) = torch.autograd.grad(cpu_kernel.routed_attention_cpu(q.detach(), kv, r_idx, **kw).sum(), (kv,))
    torch.testing.assert_close(dq, ref_dq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dkv, ref_dkv, atol=1e-5, rtol=1e-5)


def test_repeated_routing_index_counts_twice():
    """A key window routed twice to one query window (not produced by top-k, but valid input) counts twice."""
    q, kv, _ = _inputs(1, 4, 6, 6, 3, 2, 8, 8)
    r_idx = torch.tensor([[[0, 0, 1], [1, 2, 2], [3, 3, 3], [0, 1, 2]]])
    kw = dict(num_heads=2, qk_dim=8, scale=0.3)
    kernel = _out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    ref = _out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q, kv)
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_same_result_for_any_thread_count():
    q, kv, r_idx = _inputs(*CASES[0])
    kw = dict(num_heads=8, qk_dim=64, scale=0.125)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_dispatch_uses_kernel_and_logs_declines(caplog, monkeypatch):
    monkeypatch.setattr(backend_module, "_reported", set())
    calls = []
    original = cpu_kernel.routed_attention_cpu
    monkeypatch.setattr(cpu_kernel, "routed_attention_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    q, kv, r_idx = _inputs(*CASES[1])
    kw = dict(num_heads=2, qk_dim=16, scale=0.25)
    with caplog.at_level(logging.INFO, logger="yoloattn"):
        routed_attention(q, kv, r_idx, **kw)
        assert calls == [1] and caplog.text == ""
        routed_attention(q.bfloat16(), kv.bfloat16(), r_idx, **kw)
        routed_attention(q, kv, r_idx, torch.rand(r_idx.shape), **kw)
        with cpu_kernel.disabled():
            routed_attention(q, kv, r_idx, **kw)
    assert calls == [1]
    assert "uses the SDPA fast path because the CPU kernel computes in float32, got torch.bfloat16" in caplog.text
    assert "because the CPU kernel has no soft routing (r_weight)" in caplog.text
    assert "because the CPU kernel is switched off" in caplog.text


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_layer_does_not_call_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "routed_attention_cpu", lambda *a, **k: pytest.fail("kernel called while tracing"))
    layer = BiLevelRoutingAttention(32, num_heads=4).eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 32, 14, 14), check_trace=False)
    monkeypatch.undo()
    x = torch.randn(2, 32, 13, 9)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), atol=1e-5, rtol=1e-4)


def test_flop_counters_see_the_attention(monkeypatch):
    """Under an op-watching mode (FlopCounterMode; thop's function mode) the visible SDPA path runs, so the
    attention's FLOPs are counted: 2 products of 2·Lq·topk·Lkv·head size per head and window."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(cpu_kernel, "routed_attention_cpu", lambda *a, **k: pytest.fail("kernel called"))
    n, p, lq, lkv, topk, heads, qk_dim, v_dim = CASES[0]
    q, kv, r_idx = _inputs(*CASES[0])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        routed_attention(q, kv, r_idx, num_heads=heads, qk_dim=qk_dim, scale=0.125)
    assert counter.get_total_flops() == 2 * (2 * n * p * lq * topk * lkv * qk_dim)
    with torch.device("cpu"):  # a DeviceContext mode only sets defaults: the kernel still runs
        assert cpu_kernel.decline_reason(q, kv, None, heads, qk_dim) is None


def test_bad_routing_indices_raise():
    q, kv, r_idx = _inputs(*CASES[1])
    with pytest.raises(ValueError, match=r"r_idx must hold window indices in \[0, 9\), got values in \[9, 9\]"):
        cpu_kernel.routed_attention_cpu(q, kv, torch.full_like(r_idx, 9), num_heads=2, qk_dim=16, scale=0.25)


def test_falls_back_when_no_compiler(monkeypatch, tmp_path, caplog):
    """Without a working compiler the kernel reports why, and routed attention still runs (SDPA path)."""
    monkeypatch.setenv("YOLOATTN_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(backend_module, "_reported", set())
    cpu_kernel._build_library.cache_clear()
    try:
        reason = cpu_kernel.unavailable_reason()
        assert reason is not None and "could not be built" in reason and "no-such-compiler" in reason
        q, kv, r_idx = _inputs(*CASES[1])
        kw = dict(num_heads=2, qk_dim=16, scale=0.25)
        with caplog.at_level(logging.INFO, logger="yoloattn"):
            out = routed_attention(q, kv, r_idx, **kw)
        torch.testing.assert_close(out, routed_attention_reference(q, kv, r_idx, **kw)[0], atol=1e-5, rtol=1e-5)
        assert "uses the SDPA fast path because the CPU kernel could not be built" in caplog.text
    finally:
        cpu_kernel._build_library.cache_clear()
    monkeypatch.undo()
    assert cpu_kernel.unavailable_reason() is None


@pytest.mark.parametrize("pooled_kv", [False, True])
def test_image_tiles_read_in_place(pooled_kv):
    """q/kv given as (N, Py, Px, h, w, C) tiles of NHWC images: every path gives the windowed result."""
    g = torch.Generator().manual_seed(0)
    n, n_win, h, w, heads, qk_dim, v_dim = 2, 3, 5, 4, 2, 8, 16
    img = torch.randn(n, n_win * h, n_win * w, 2 * qk_dim + v_dim, generator=g)  # like the qkv projection
    q_img, kv_img = img.split([qk_dim, qk_dim + v_dim], dim=-1)
    q = q_img.view(n, n_win, h, n_win, w, qk_dim).transpose(2, 3).requires_grad_()
    kv = kv_img.view(n, n_win, h, n_win, w, qk_dim + v_dim).transpose(2, 3)
    if pooled_kv:
        kv = kv.reshape(n, n_win * n_win, h * w, -1)[:, :, ::3]  # strided token rows of window blocks
    kv = kv.detach().requires_grad_()
    p = n_win * n_win
    r_idx = torch.stack([torch.randperm(p, generator=g)[:4] for _ in range(n * p)]).view(n, p, 4)
    kw = dict(num_heads=heads, qk_dim=qk_dim, scale=0.3)
    results = {}
    for name, ctx in (("kernel", contextlib.nullcontext()), ("sdpa", cpu_kernel.disabled())):
        with ctx:
            results[name] = _out_and_grads(lambda q, kv: routed_attention(q, kv, r_idx, **kw), q, kv)
    results["reference"] = _out_and_grads(lambda q, kv: routed_attention(q, kv, r_idx, backend="reference", **kw), q, kv)
    expected = routed_attention_reference(q.detach().reshape(n, p, h * w, qk_dim),
                                          kv.detach().reshape(n, p, -1, qk_dim + v_dim), r_idx, **kw)[0]
    assert results["kernel"][0].shape == (n, n_win, n_win, h, w, v_dim)
    torch.testing.assert_close(results["kernel"][0].reshape(n, p, h * w, v_dim), expected, atol=1e-5, rtol=1e-5)
    for name in ("sdpa", "reference"):
        for a, b in zip(results["kernel"], results[name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1.0, 12.0, 40.0])
def test_large_logits_take_the_max_subtracting_path(magnitude):
    """Logits past the one-pass bound (|q|·max|k| in log2 units > 64) switch a block to the two-pass softmax
    with its max subtracted; tiny exponentials are flushed to zero, not left subnormal. Both agree with the
    reference, also when some blocks of a window take one path and some the other."""
    n, p, lq, lkv, topk, heads, qk_dim, v_dim = 2, 9, 40, 24, 3, 2, 16, 16
    q, kv, r_idx = _inputs(n, p, lq, lkv, topk, heads, qk_dim, v_dim, strided=False, seed=3)
    with torch.no_grad():
        q[:, :, :lq // 2] *= magnitude  # the first half of every window's queries gets large logits
        kv[..., :qk_dim] *= magnitude
    kw = dict(num_heads=heads, qk_dim=qk_dim, scale=qk_dim**-0.5)
    bound = (q.detach().view(n, p, lq, heads, -1).norm(dim=-1).amax() * kw["scale"] * 1.4427
             * kv.detach()[..., :qk_dim].reshape(n, p, lkv, heads, -1).norm(dim=-1).amax())
    assert (bound > 64) == (magnitude > 1)  # the grid covers both paths
    kernel = _out_and_grads(lambda q, kv: cpu_kernel.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    ref = _out_and_grads(lambda q, kv: routed_attention_reference(q.double(), kv.double(), r_idx, **kw)[0], q, kv)
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a, b.float(), atol=1e-5 * magnitude**2, rtol=1e-5)


def _padded_tiles(n, height, width, n_win, heads, qk_dim, v_dim, seed=0):
    """q/kv tiles of a projected (N, H', W', C) image padded up to multiples of n_win, like BRA's."""
    g = torch.Generator().manual_seed(seed)
    ph, pw = -(-height // n_win) * n_win, -(-width // n_win) * n_win
    img = torch.randn(n, ph, pw, 2 * qk_dim + v_dim, generator=g)
    q_img, kv_img = img.split([qk_dim, qk_dim + v_dim], dim=-1)
    tile = lambda t: t.view(n, n_win, ph // n_win, n_win, pw // n_win, t.shape[-1]).transpose(2, 3)
    p = n_win * n_win
    r_idx = torch.stack([torch.randperm(p, generator=g)[:min(4, p)] for _ in range(n * p)]).view(n, p, -1)
    return tile(q_img).detach().requires_grad_(), tile(kv_img).detach().requires_grad_(), r_idx


# (n, H, W, n_win): padded on both sides, on one side, not at all, and padding that fills whole windows
VALID_CASES = [(1, 80, 80, 7), (2, 13, 9, 3), (1, 12, 15, 4), (2, 8, 8, 4), (1, 5, 3, 7)]


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: "-".join(map(str, c)))
def test_valid_hw_returns_the_cropped_image_on_every_path(case):
    n, height, width, n_win = case
    heads, qk_dim, v_dim = 2, 16, 16
    q, kv, r_idx = _padded_tiles(n, height, width, n_win, heads, qk_dim, v_dim)
    kw = dict(num_heads=heads, qk_dim=qk_dim, scale=qk_dim**-0.5)
    full = routed_attention(q.detach(), kv.detach(), r_idx, backend="reference", **kw)
    expected = full.transpose(2, 3).reshape(n, q.shape[1] * q.shape[3], q.shape[2] * q.shape[4], v_dim)
    expected = expected[:, :height, :width]
    results = {}
    for name, ctx, backend in (("kernel", contextlib.nullcontext(), None), ("sdpa", cpu_kernel.disabled(), None),
                               ("reference", contextlib.nullcontext(), "reference")):
        with ctx:
            results[name] = _out_and_grads(
                lambda q, kv: routed_attention(q, kv, r_idx, valid_hw=(height, width), backend=backend, **kw), q, kv)
    assert results["kernel"][0].shape == (n, height, width, v_dim)
    torch.testing.assert_close(results["kernel"][0], expected, atol=1e-5, rtol=1e-5)
    for name in ("sdpa", "reference"):
        for a, b in zip(results["kernel"], results[name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the padded queries pass no gradient
    dq = results["kernel"][1].transpose(2, 3).reshape(n, q.shape[1] * q.shape[3], q.shape[2] * q.shape[4], qk_dim)
    assert torch.count_nonzero(dq[:, height:]) == 0 and torch.count_nonzero(dq[:, :, width:]) == 0


def test_inference_call_matches_autograd_call():
    """Without autograd the kernel keeps no log-sum-exp (a separate entry); the outputs are the same."""
    q, kv, r_idx = _padded_tiles(2, 13, 9, 3, 2, 16, 16)
    kw = dict(num_heads=2, qk_dim=16, scale=0.25)
    for valid_hw in (None, (13, 9)):
        with_grad = cpu_kernel.routed_attention_cpu(q, kv, r_idx, valid_hw=valid_hw, **kw)
        with torch.no_grad():
            without = cpu_kernel.routed_attention_cpu(q, kv, r_idx, valid_hw=valid_hw, **kw)
        assert with_grad.grad_fn is not None and without.grad_fn is None
        torch.testing.assert_close(with_grad.detach(), without, atol=0, rtol=0)


@pytest.mark.parametrize("valid_hw", [(0, 4), (3,), (2.0, 3), "80x80", (True, 2)])
def test_bad_valid_hw_raises(valid_hw):
    q, kv, r_idx = _padded_tiles(1, 6, 6, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="valid_hw"):
        routed_attention(q, kv, r_idx, num_heads=2, qk_dim=8, scale=0.3, valid_hw=valid_hw)
    with pytest.raises(ValueError, match="valid_hw"):  # the kernel's own entry checks it too
        cpu_kernel.routed_attention_cpu(q, kv, r_idx, num_heads=2, qk_dim=8, scale=0.3, valid_hw=valid_hw)
    q4, kv4 = q.detach().reshape(1, 4, 9, 8), kv.detach().reshape(1, 4, 9, 16)
    for fn in (routed_attention, cpu_kernel.routed_attention_cpu):
        with pytest.raises(ValueError, match="valid_hw needs q as"):
            fn(q4, kv4, r_idx, num_heads=2, qk_dim=8, scale=0.3, valid_hw=(3, 3))
