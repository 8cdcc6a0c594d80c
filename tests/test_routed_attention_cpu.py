"""The compiled CPU kernel of routed attention (every ISA build this machine runs) against the reference math,
its op registration (opcheck, torch.compile, torch.export, FLOP counters) and its argument checks."""

import platform

import pytest
import torch

from yoloattn.nn import BackendUnavailableError, use_backend
from yoloattn.nn.functional import ROUTED_ATTENTION, routed_attention, routed_attention_reference
from yoloattn.nn.functional import routed_attention_cpu as cpu

pytestmark = pytest.mark.skipif(not cpu.build_info()["available"],
                                reason=f"CPU kernel unavailable: {cpu.build_info().get('reason')}")

X86 = platform.machine() in ("x86_64", "AMD64")
# every build this machine can run: native, and on x86-64 the AVX2 (x86-64-v3) and SSE2 (x86-64) targets
BUILDS = ["native", *(["x86-64-v3", "x86-64"] if X86 else [])]


def _build_or_skip(march: str):
    with cpu.use_build(march):
        info = cpu.build_info()
    if not info["available"]:
        pytest.skip(info["reason"])
    return cpu.use_build(march)


def padded_tiles(n, height, width, n_win, heads, qk_dim, v_dim, topk=4, seed=0, pool=None):
    """q/kv tiles of a projected (N, H', W', C) image zero-padded up to multiples of n_win, as BRA cuts them;
    ``pool`` = L turns the key tiles into pooled windows of L tokens (a (N, Py, Px, 1, L, C) window layout)."""
    g = torch.Generator().manual_seed(seed)
    ph, pw = -(-height // n_win) * n_win, -(-width // n_win) * n_win
    img = torch.randn(n, ph, pw, 2 * qk_dim + v_dim, generator=g)
    q_img, kv_img = img.split([qk_dim, qk_dim + v_dim], dim=-1)
    tile = lambda t: t.view(n, n_win, ph // n_win, n_win, pw // n_win, t.shape[-1]).transpose(2, 3)
    q, kv = tile(q_img), tile(kv_img)
    if pool:
        kv = torch.randn(n, n_win, n_win, 1, pool, qk_dim + v_dim, generator=g)
    p = n_win * n_win
    r_idx = torch.stack([torch.randperm(p, generator=g)[:min(topk, p)] for _ in range(n * p)]).view(n, p, -1)
    return q.detach().requires_grad_(), kv.detach().requires_grad_(), r_idx


def out_and_grads(fn, q, kv, seed=1):
    out = fn(q, kv)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out.detach(), *torch.autograd.grad((out * weight).sum(), (q, kv)))


def assert_close_to(kernel, ref, atol=1e-5):
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol * max(1.0, b.abs().max().item()), rtol=1e-5)


def _kw(heads, qk_dim, height, width):
    return dict(num_heads=heads, scale=qk_dim**-0.5, valid_hw=(height, width))


@pytest.mark.parametrize("march", BUILDS)
def test_every_size_1_to_16_every_build(march):
    """Every H and W in 1..16 for n_win 7 and 4 (windows of 1 token high or wide, partial and empty padded
    windows), batch 2: outputs and both gradients against the reference."""
    with _build_or_skip(march):
        failures = []
        for n_win in (7, 4):
            for height in range(1, 17):
                for width in range(1, 17):
                    q, kv, r_idx = padded_tiles(2, height, width, n_win, 2, 8, 8, seed=height * 17 + width)
                    kw = _kw(2, 8, height, width)
                    got = out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
                    ref = out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q, kv)
                    if not all(torch.allclose(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)
                               for a, b in zip(got, ref)):
                        failures.append((n_win, height, width))
        assert failures == []


# (n, H, W, n_win, heads, qk_dim, v_dim, topk, pool): the specialised head sizes 8/16/32 and generic ones
# (4, 6 vs 10, 16 vs 8), token counts that are and are not multiples of every vector width, topk = P,
# pooled keys (Lkv < Lq), batch 3
CASES = [
    (1, 80, 80, 7, 8, 64, 64, 4, None),  # YOLOv8n P3 at 640
    (2, 13, 9, 3, 2, 16, 16, 3, None),
    (2, 8, 8, 2, 4, 64, 32, 2, None),
    (1, 20, 20, 2, 1, 8, 8, 4, None),
    (2, 24, 24, 4, 4, 128, 128, 5, 9),
    (3, 17, 33, 2, 2, 12, 20, 2, None),
    (1, 1, 1, 1, 1, 4, 4, 1, None),
]


@pytest.mark.parametrize("march", BUILDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_head_sizes_and_pooled_keys(case, march):
    n, height, width, n_win, heads, qk_dim, v_dim, topk, pool = case
    with _build_or_skip(march):
        q, kv, r_idx = padded_tiles(n, height, width, n_win, heads, qk_dim, v_dim, topk, pool=pool)
        kw = _kw(heads, qk_dim, height, width)
        got = out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
        ref = out_and_grads(lambda q, kv: routed_attention_reference(q.double(), kv.double(), r_idx, **kw)[0], q, kv)
        assert_close_to(got, ref)


@pytest.mark.parametrize("march", BUILDS)
@pytest.mark.parametrize("magnitude", [1.0, 12.0, 40.0])
def test_large_logits_take_the_max_subtracting_path(magnitude, march):
    """Logits past the one-pass bound (|q|·max|k| in log2 units > 64) switch a block to the two-pass softmax
    with its max subtracted; tiny exponentials are flushed to zero, not left subnormal. Both agree with a
    float64 reference, also when some blocks of a window take one path and some the other."""
    q, kv, r_idx = padded_tiles(2, 18, 18, 3, 2, 16, 16, 3, seed=3)
    with torch.no_grad():
        q[:, :, :, :3] *= magnitude  # the top half of every window's queries gets large logits
        kv[..., :16] *= magnitude
    kw = _kw(2, 16, 18, 18)
    bound = (q.detach().reshape(-1, 2, 8).norm(dim=-1).amax() * kw["scale"] * 1.4427
             * kv.detach()[..., :16].reshape(-1, 2, 8).norm(dim=-1).amax())
    assert (bound > 64) == (magnitude > 1)  # the grid covers both paths
    with _build_or_skip(march):
        got = out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    ref = out_and_grads(lambda q, kv: routed_attention_reference(q.double(), kv.double(), r_idx, **kw)[0], q, kv)
    assert_close_to(got, ref, atol=1e-5 * magnitude**2)


def test_non_contiguous_channels_are_copied_not_misread():
    q, kv, r_idx = padded_tiles(2, 13, 9, 3, 2, 8, 8)
    q_t = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # channel stride != 1
    assert q_t.stride(-1) != 1
    kw = _kw(2, 8, 13, 9)
    got = out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q_t, kv)
    ref = out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q_t, kv)
    assert_close_to(got, ref)


def test_only_requested_gradients_and_padded_queries_pass_none():
    height, width = 13, 9
    q, kv, r_idx = padded_tiles(2, height, width, 3, 2, 16, 16)
    kw = _kw(2, 16, height, width)
    ref_dq, ref_dkv = torch.autograd.grad(routed_attention_reference(q, kv, r_idx, **kw)[0].sum(), (q, kv))
    (dq,) = torch.autograd.grad(cpu.routed_attention_cpu(q, kv.detach(), r_idx, **kw).sum(), (q,))
    (dkv,) = torch.autograd.grad(cpu.routed_attention_cpu(q.detach(), kv, r_idx, **kw).sum(), (kv,))
    torch.testing.assert_close(dq, ref_dq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dkv, ref_dkv, atol=1e-5, rtol=1e-5)
    dq_img = dq.transpose(2, 3).reshape(2, 15, 9, 16)
    assert torch.count_nonzero(dq_img[:, height:]) == 0


def test_repeated_routing_index_counts_twice():
    """A key window routed twice to one query window (not produced by top-k, but valid input) counts twice."""
    q, kv, _ = padded_tiles(1, 4, 6, 2, 2, 8, 8)
    r_idx = torch.tensor([[[0, 0, 1], [1, 2, 2], [3, 3, 3], [0, 1, 2]]])
    kw = _kw(2, 8, 4, 6)
    got = out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q, kv)
    ref = out_and_grads(lambda q, kv: routed_attention_reference(q, kv, r_idx, **kw)[0], q, kv)
    assert_close_to(got, ref)


@pytest.mark.parametrize("march", BUILDS)
def test_same_bits_for_any_thread_count(march):
    q, kv, r_idx = padded_tiles(2, 30, 26, 7, 8, 64, 64)
    kw = _kw(8, 64, 30, 26)
    previous = torch.get_num_threads()
    results = []
    with _build_or_skip(march):
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(out_and_grads(lambda q, kv: cpu.routed_attention_cpu(q, kv, r_idx, **kw), q, kv))
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_inference_call_matches_autograd_call():
    """Without autograd the op keeps no log-sum-exp; the outputs are bitwise the same."""
    q, kv, r_idx = padded_tiles(2, 13, 9, 3, 2, 16, 16)
    kw = _kw(2, 16, 13, 9)
    with_grad = cpu.routed_attention_cpu(q, kv, r_idx, **kw)
    with torch.no_grad():
        without = cpu.routed_attention_cpu(q, kv, r_idx, **kw)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad.detach(), without)


# ---- the C++ boundary: every layout is checked, a wrong one is an error, never a wrong number ---------------
def test_bad_routing_indices_raise():
    q, kv, r_idx = padded_tiles(1, 6, 6, 3, 2, 16, 16)
    with pytest.raises(ValueError, match=r"r_idx must hold window indices in \[0, 9\)"):
        cpu.routed_attention_cpu(q, kv, torch.full_like(r_idx, 9), num_heads=2, scale=0.25, valid_hw=(6, 6))
    with pytest.raises(ValueError, match=r"r_idx must hold window indices"):
        cpu.routed_attention_cpu(q, kv, -torch.ones_like(r_idx), num_heads=2, scale=0.25, valid_hw=(6, 6))


@pytest.mark.parametrize("what,match", [
    ("lse", r"lse must be contiguous"),
    ("lse_dtype", r"lse must be a 4-D torch.float32 CPU tensor"),
    ("r_idx", r"r_idx must be contiguous"),
    ("r_idx_dtype", r"r_idx must be a 3-D torch.int64 CPU tensor"),
    ("lse_shape", r"lse .* do not match the forward"),
])
def test_backward_op_checks_every_layout(what, match):
    q, kv, r_idx = padded_tiles(1, 6, 6, 3, 2, 8, 8)
    out, lse = torch.ops.yoloattn.routed_attention(q.detach(), kv.detach(), r_idx, 2, 0.3, 6, 6, True)
    dout = torch.randn_like(out)
    args = dict(lse=lse, r_idx=r_idx)
    if what == "lse":
        args["lse"] = lse.transpose(2, 3).contiguous().transpose(2, 3)
    elif what == "lse_dtype":
        args["lse"] = lse.double()
    elif what == "r_idx":
        args["r_idx"] = r_idx.transpose(1, 2).contiguous().transpose(1, 2)
    elif what == "r_idx_dtype":
        args["r_idx"] = r_idx.int()
    elif what == "lse_shape":
        args["lse"] = lse[:, :4].contiguous()
    with pytest.raises(ValueError, match=match):
        torch.ops.yoloattn.routed_attention_backward(dout, q.detach(), kv.detach(), args["r_idx"], out, args["lse"],
                                                     2, 0.3, True, True)


def test_struct_sizes_agree_with_the_library():
    lib = cpu._library()
    assert lib.yoloattn_args_size() == cpu.ctypes.sizeof(cpu._Args)
    assert lib.yoloattn_abi() == cpu._ABI and lib.yoloattn_max_head_dim() == cpu.MAX_HEAD_DIM


def test_the_library_rejects_a_mismatched_argument_block():
    """The C++ side checks the ABI number and the block size itself and returns a status that is raised."""
    q, kv, r_idx = padded_tiles(1, 6, 6, 3, 2, 8, 8)
    args = cpu._args(q.detach(), kv.detach(), r_idx, 2, 0.3, 6, 6)
    out = torch.empty(1, 6, 6, 8)
    args.out = cpu._image_tiles(out, q, "out")
    args.abi = cpu._ABI + 1
    with pytest.raises(ValueError, match="ABI or argument block size differs"):
        cpu._call("yoloattn_routed_forward", args)
    args.abi, args.rows_valid = cpu._ABI, 99
    with pytest.raises(ValueError, match="inconsistent sizes"):
        cpu._call("yoloattn_routed_forward", args)


# ---- the op's registration -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [(1, 6, 6, 3, 2, 8, 8, 2, None), (2, 13, 9, 3, 2, 16, 16, 3, None),
                                  (1, 8, 8, 2, 2, 8, 24, 2, 5)], ids=lambda c: "-".join(map(str, c)))
def test_opcheck(case):
    n, height, width, n_win, heads, qk_dim, v_dim, topk, pool = case
    q, kv, r_idx = padded_tiles(n, height, width, n_win, heads, qk_dim, v_dim, topk, pool=pool)
    for with_lse in (True, False):
        args = (q, kv, r_idx, heads, qk_dim**-0.5, height, width, with_lse)
        tests = ("test_schema", "test_faketensor")
        if with_lse:  # without the log-sum-exp there is no backward to check
            tests = (*tests, "test_aot_dispatch_dynamic", "test_autograd_registration")
        torch.library.opcheck(torch.ops.yoloattn.routed_attention.default, args, test_utils=tests)


def _projection(n, height, width, qk_dim, v_dim, n_win, topk, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, height, width, 2 * qk_dim + v_dim, generator=g)
    r_idx = torch.stack([torch.randperm(n_win * n_win, generator=g)[:topk] for _ in range(n * n_win * n_win)])
    return qkv.requires_grad_(), r_idx.view(n, n_win * n_win, topk)


@pytest.mark.parametrize("case", [(1, 6, 6, 3, 2, 8, 8, 2), (2, 14, 21, 7, 2, 8, 16, 3)],
                         ids=lambda c: "-".join(map(str, c)))
def test_opcheck_projection_op(case):
    n, height, width, n_win, heads, qk_dim, v_dim, topk = case
    qkv, r_idx = _projection(n, height, width, qk_dim, v_dim, n_win, topk)
    for valid in ((height, width), (height - 1, width - 2)):
        args = (qkv, r_idx, heads, qk_dim, n_win, qk_dim**-0.5, *valid)
        torch.library.opcheck(torch.ops.yoloattn.routed_attention_qkv.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic",
                                          "test_autograd_registration"))


@pytest.mark.parametrize("march", BUILDS)
def test_projection_op_equals_the_tile_op(march):
    """The projection op's out and v, and its one gradient of qkv with the values' gradient added in, equal the
    tile op's out and gradients of q and kv plus the values' gradient, to the bit (the same kernel, the same sums)."""
    _build_or_skip(march)
    n, height, width, n_win, heads, qk_dim, v_dim, topk = 2, 13, 9, 3, 2, 8, 16, 4
    qkv, r_idx = _projection(n, 15, 9, qk_dim, v_dim, n_win, topk)
    g_out, g_v = torch.randn(n, height, width, v_dim), torch.randn(n, 15, 9, v_dim)
    with cpu.use_build(march):
        out, v = cpu.routed_attention_qkv_cpu(qkv, r_idx, num_heads=heads, qk_dim=qk_dim, n_win=n_win, scale=0.3,
                                              valid_hw=(height, width))
        (dqkv,) = torch.autograd.grad([out, v], [qkv], [g_out, g_v])
        base = qkv.detach().clone().requires_grad_()
        q, kv = cpu._qkv_tiles(base, qk_dim, n_win)
        expected = cpu.routed_attention_cpu(q, kv, r_idx, num_heads=heads, scale=0.3, valid_hw=(height, width))
        values = base[..., 2 * qk_dim:]
        (expected_dqkv,) = torch.autograd.grad([expected, values], [base], [g_out, g_v])
    assert torch.equal(out, expected) and torch.equal(v, qkv.detach()[..., 2 * qk_dim:])
    assert v.is_contiguous() and v.data_ptr() != qkv.data_ptr()
    assert torch.equal(dqkv, expected_dqkv)
    (dqkv_no_v,) = torch.autograd.grad(cpu.routed_attention_qkv_cpu(
        qkv, r_idx, num_heads=heads, qk_dim=qk_dim, n_win=n_win, scale=0.3, valid_hw=(height, width))[0], [qkv], g_out)
    torch.testing.assert_close(dqkv_no_v, expected_dqkv - torch.cat([torch.zeros(n, 15, 9, 2 * qk_dim), g_v], -1),
                               atol=1e-6, rtol=0)


def test_projection_op_rejects_a_bad_projection():
    qkv, r_idx = _projection(1, 7, 7, 8, 8, 3, 2)
    with pytest.raises(ValueError, match=r"H and W multiples of n_win=3"):
        cpu.routed_attention_qkv_cpu(qkv, r_idx, num_heads=2, qk_dim=8, n_win=3, scale=0.3, valid_hw=(7, 7))
    qkv, r_idx = _projection(1, 6, 6, 8, 8, 3, 2)
    with pytest.raises(ValueError, match=r"2·qk_dim \+ Cv"):
        cpu.routed_attention_qkv_cpu(qkv, r_idx, num_heads=2, qk_dim=12, n_win=3, scale=0.3, valid_hw=(6, 6))


def test_flop_counter_counts_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    q, kv, r_idx = padded_tiles(1, 14, 14, 7, 2, 16, 16, 4)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cpu.routed_attention_cpu(q, kv, r_idx, num_heads=2, scale=0.25, valid_hw=(14, 14))
    n, p, lq, lkv, topk = 1, 49, 4, 4, 4
    assert counter.get_total_flops() == 2 * n * p * lq * topk * lkv * (16 + 16)  # q·k and p·v, as SDPA


def test_named_backend_that_cannot_run_raises():
    q, kv, r_idx = padded_tiles(1, 6, 6, 3, 2, 8, 8)
    with pytest.raises(BackendUnavailableError, match=r"'cpu' backend cannot run this call: the kernel computes in "
                                                      r"float32, got torch.float64"):
        routed_attention(q.double(), kv.double(), r_idx, num_heads=2, scale=0.3, backend="cpu")
    with use_backend(routed_attention="cpu"), pytest.raises(BackendUnavailableError, match="no soft routing"):
        routed_attention(q, kv, r_idx, torch.rand(r_idx.shape), num_heads=2, scale=0.3)


def _bra_model():
    from yoloattn.nn import BiLevelRoutingAttention

    return BiLevelRoutingAttention(32, num_heads=4).eval()


@pytest.mark.slow
def test_torch_compile_keeps_the_kernel_fullgraph_static_and_dynamic():
    layer = _bra_model()
    for dynamic in (False, True):
        compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
        for shape in [(1, 32, 14, 14), (2, 32, 13, 9)]:
            x = torch.randn(shape)
            with torch.no_grad(), use_backend(routed_attention="cpu"):
                torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-4)
    # training through the compiled layer: the op's autograd registration
    compiled = torch.compile(layer.train(), fullgraph=True)
    x = torch.randn(2, 32, 13, 9, requires_grad=True)
    with use_backend(routed_attention="cpu"):
        (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
        (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_torch_export_dynamic_hw():
    """torch.export with dynamic H and W keeps the op and matches eager at other sizes, padded or not; sizes of at
    most n_win (one-token-high window tiles, which PyTorch specialises) are refused by the program's guard."""
    layer = _bra_model()
    auto = torch.export.Dim.AUTO
    with use_backend(routed_attention="cpu"):
        exported = torch.export.export(layer, (torch.randn(1, 32, 13, 9),), dynamic_shapes={"x": {2: auto, 3: auto}},
                                       strict=False)
    assert any("yoloattn.routed_attention" in str(n.target) for n in exported.graph.nodes)
    module = exported.module()
    for shape in [(1, 32, 13, 9), (1, 32, 14, 14), (1, 32, 8, 21), (1, 32, 40, 23)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(module(x), layer(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="Guard failed"):
        module(torch.randn(1, 32, 5, 5))
