"""BiFormer block: every attention mode, norms, layer scale, state_dict layout."""

import pytest
import torch
from einops import rearrange

from official_bra_reference import official_bra_forward
from yoloattn import BiFormerBlock, use_backend

MODES = [4, 1, -1, -2, 0]


def _official_attention(attn, x, lepe):
    """BiFormer's Attention / AttentionLePE math on NHWC x, restated for the test."""
    n, h, w, c = x.shape
    tokens = rearrange(x, "n h w c -> n (h w) c")
    q, k, v = rearrange(attn.qkv(tokens), "n l (three m c) -> three n m l c", three=3, m=attn.num_heads)
    out = rearrange(((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v, "n m l c -> n l (m c)")
    if lepe:
        out = out + rearrange(attn.lepe(rearrange(x, "n h w c -> n c h w")), "n c h w -> n (h w) c")
    return rearrange(attn.proj(out), "n (h w) c -> n h w c", h=h, w=w)


def _official_block(block, x, topk):
    """BiFormer Block.forward restated (pre/post norm, layer scale), eval mode."""
    x = x + block.pos_embed(x)
    x = x.permute(0, 2, 3, 1)

    def attn(t):
        if topk > 0:
            return official_bra_forward(block.attn, t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if topk in (-1, -2):
            return _official_attention(block.attn, t, lepe=topk == -2)
        return block.attn(t)

    g1 = block.gamma1 if block.use_layer_scale else 1.0
    g2 = block.gamma2 if block.use_layer_scale else 1.0
    if block.pre_norm:
        x = x + g1 * attn(block.norm1(x))
        x = x + g2 * block.mlp(block.norm2(x))
    else:
        x = block.norm1(x + g1 * attn(x))
        x = block.norm2(x + g2 * block.mlp(x))
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("layer_scale", [-1, 1e-2])
@pytest.mark.parametrize("topk", MODES)
def test_block_modes_match_official_and_backends(topk, layer_scale, pre_norm):
    block = BiFormerBlock(32, num_heads=4, n_win=2, topk=topk, layer_scale_init_value=layer_scale,
                          pre_norm=pre_norm, mlp_dwconv=topk == 4, auto_pad=True).eval()
    x = torch.randn(2, 32, 9, 7, requires_grad=True)
    outs = {}
    for backend in ("auto", "reference"):
        with use_backend(backend):
            out = block(x)
        outs[backend] = (out, torch.autograd.grad(out.square().sum(), [x, *block.parameters()]))
    torch.testing.assert_close(outs["auto"][0], outs["reference"][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(outs["auto"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, atol=3e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)
    torch.testing.assert_close(outs["auto"][0], _official_block(block, x, topk), atol=1e-5, rtol=1e-4)
    assert outs["auto"][0].shape == x.shape


def test_block_defaults_like_the_official_example():
    block = BiFormerBlock(128)  # the official example: Block(dim=128) on (1, 128, 28, 28)
    assert block.attn.kv_downsample_mode == "ada_avgpool" and block.attn.side_dwconv == 5
    assert not block.attn.auto_pad and block.mlp[0].out_features == 512
    assert block(torch.randn(1, 128, 28, 28)).shape == (1, 128, 28, 28)


def test_drop_path_train_and_eval():
    block = BiFormerBlock(16, num_heads=2, topk=-1, drop_path=0.5)
    x = torch.randn(8, 16, 6, 6)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(2)
    b = block(x)
    assert not torch.allclose(a, b)


def test_gradcheck_float64_block():
    block = BiFormerBlock(8, num_heads=2, n_win=2, topk=2, mlp_ratio=2, auto_pad=True,
                          kv_downsample_mode="identity").double()
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_bf16_autocast_finite():
    block = BiFormerBlock(32, num_heads=4, n_win=2, auto_pad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 32, 11, 13) * 10)
    assert torch.isfinite(out.float()).all()


def test_state_dict_keys_match_the_official_layout():
    assert list(BiFormerBlock(64, mlp_dwconv=True, layer_scale_init_value=1e-6).state_dict()) == [
        "gamma1", "gamma2", "pos_embed.weight", "pos_embed.bias", "norm1.weight", "norm1.bias",
        "attn.lepe.weight", "attn.lepe.bias", "attn.qkv.qkv.weight", "attn.qkv.qkv.bias", "attn.wo.weight",
        "attn.wo.bias", "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.1.dwconv.weight",
        "mlp.1.dwconv.bias", "mlp.3.weight", "mlp.3.bias"]
    assert [k for k in BiFormerBlock(64, topk=-1).state_dict() if k.startswith("attn.")] == [
        "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"]
    assert [k for k in BiFormerBlock(64, topk=-2).state_dict() if k.startswith("attn.")] == [
        "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "attn.lepe.weight", "attn.lepe.bias"]
    assert [k for k in BiFormerBlock(64, topk=0).state_dict() if k.startswith("attn.")] == [
        "attn.1.weight", "attn.1.bias", "attn.2.weight", "attn.2.bias", "attn.3.weight", "attn.3.bias"]
    assert "pos_embed.weight" not in BiFormerBlock(64, before_attn_dwconv=0).state_dict()


def test_official_block_state_dict_loads_strict():
    # keys in BiFormer's registration order (gamma registered last there); load must not care about order
    reference = BiFormerBlock(32, num_heads=4, layer_scale_init_value=1.0).state_dict()
    official_order = {k: torch.randn_like(v) for k, v in reference.items() if not k.startswith("gamma")}
    official_order.update(gamma1=torch.randn(32), gamma2=torch.randn(32))
    block = BiFormerBlock(32, num_heads=4, layer_scale_init_value=1.0)
    block.load_state_dict(official_order, strict=True)
    assert torch.equal(block.gamma2, official_order["gamma2"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=32, topk=-3), r"topk must be > 0 \(BRA\), -1 \(attention\), -2 .* got -3"),
    (dict(dim=32, before_attn_dwconv=4), r"before_attn_dwconv must be 0 \(off\) or an odd kernel size, got 4"),
    (dict(dim=32, drop_path=1.0), r"drop_path must be in \[0, 1\), got 1.0"),
    (dict(dim=30, topk=-1), r"dim=30 must be divisible by num_heads=8"),
    (dict(dim=32, topk=-2, side_dwconv=2), r"side_dwconv must be 0 \(off\) or an odd kernel size, got 2"),
    (dict(dim=32, mlp_ratio=0), r"mlp_ratio must be positive, got 0"),
    (dict(dim=32, topk=50), r"topk must be an integer in \[1, n_win²=49\]"),
])
def test_bad_block_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiFormerBlock(**kwargs)


def test_block_bad_input_raises():
    with pytest.raises(ValueError, match=r"expects a \(N, 32, H, W\) tensor, got shape \(1, 16, 7, 7\)"):
        BiFormerBlock(32, num_heads=4)(torch.randn(1, 16, 7, 7))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("topk", [4, -2])
def test_onnx_dynamic_matches_onnxruntime(topk, tmp_path):
    from attention_checks import onnx_matches_onnxruntime

    block = BiFormerBlock(32, n_win=4, num_heads=2, topk=topk)
    onnx_matches_onnxruntime(block, (1, 32, 16, 16), [(2, 32, 12, 20), (1, 32, 4, 8)], tmp_path, atol=5e-5)  # the official auto_pad=False
