"""BiFormer, the whole network: official key layout and parameter counts, strict loading of official-layout
checkpoints, the network against a plain re-statement of the official math, dense outputs, gradient
checkpointing, timm integration, bad configurations."""

import argparse
import copy
import fractions
import hashlib
import sys

import pytest
import torch
import torch.nn.functional as F

from official_bra_reference import official_bra_forward
from yoloattn import use_backend
from yoloattn.models import (
    BiFormer,
    biformer_base,
    biformer_dense,
    biformer_small,
    biformer_tiny,
    checkpoint_state_dict,
    load_checkpoint,
    register_timm,
)

# ---- the official key layout, restated ----------------------------------------------------------------------
OFFICIAL = {  # (depth, embed_dim = qk_dims) of the official factories; mlp_ratio 3, topks (1, 4, 16, -2)
    "biformer_tiny": ((2, 2, 8, 2), (64, 128, 256, 512)),
    "biformer_small": ((4, 4, 18, 4), (64, 128, 256, 512)),
    "biformer_base": ((4, 4, 18, 4), (96, 192, 384, 768)),
}
# sha256 of "key shape" lines in the official registration order, and of the sorted key names (both computed from
# the official models/biformer.py), first 16 hex digits
LAYOUT_SHA = {"biformer_tiny": "ca797e1cecff8190", "biformer_small": "b9f518aaea27ec89", "biformer_base": "11123660aa2a54dc"}
SORTED_KEYS_SHA = {"biformer_tiny": "627761dc25d900ff", "biformer_small": "c6492e5204c146d1",
                   "biformer_base": "c6492e5204c146d1"}
PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
ENTRIES = {"biformer_tiny": 264, "biformer_small": 518, "biformer_base": 518}
# without norm and head, plus the four extra_norms (BiFormer_mm)
DENSE_PARAMS = {"biformer_tiny": 12_630_656, "biformer_small": 25_024_128, "biformer_base": 56_037_312}
FACTORIES = {"biformer_tiny": biformer_tiny, "biformer_small": biformer_small, "biformer_base": biformer_base}


def official_layout(depth, embed_dim, qk_dims=None, topks=(1, 4, 16, -2), mlp_ratio=3, num_classes=1000):
    """[(key, shape)] of the official BiFormer in registration order (models/biformer.py, factories' settings)."""
    qk_dims = qk_dims or embed_dim
    keys = []

    def bn(prefix, c):
        keys.extend([(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
                     (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())])

    c0 = embed_dim[0]
    keys += [("downsample_layers.0.0.weight", (c0 // 2, 3, 3, 3)), ("downsample_layers.0.0.bias", (c0 // 2,))]
    bn("downsample_layers.0.1", c0 // 2)
    keys += [("downsample_layers.0.3.weight", (c0, c0 // 2, 3, 3)), ("downsample_layers.0.3.bias", (c0,))]
    bn("downsample_layers.0.4", c0)
    for i in range(1, 4):
        keys += [(f"downsample_layers.{i}.0.weight", (embed_dim[i], embed_dim[i - 1], 3, 3)),
                 (f"downsample_layers.{i}.0.bias", (embed_dim[i],))]
        bn(f"downsample_layers.{i}.1", embed_dim[i])
    for i in range(4):
        c, qk, h = embed_dim[i], qk_dims[i], int(mlp_ratio * embed_dim[i])
        for j in range(depth[i]):
            p = f"stages.{i}.{j}"
            keys += [(f"{p}.pos_embed.weight", (c, 1, 3, 3)), (f"{p}.pos_embed.bias", (c,)),
                     (f"{p}.norm1.weight", (c,)), (f"{p}.norm1.bias", (c,))]
            if topks[i] > 0:
                keys += [(f"{p}.attn.lepe.weight", (c, 1, 5, 5)), (f"{p}.attn.lepe.bias", (c,)),
                         (f"{p}.attn.qkv.qkv.weight", (2 * qk + c, c)), (f"{p}.attn.qkv.qkv.bias", (2 * qk + c,)),
                         (f"{p}.attn.wo.weight", (c, c)), (f"{p}.attn.wo.bias", (c,))]
            else:  # AttentionLePE: qkv without bias, proj, lepe
                keys += [(f"{p}.attn.qkv.weight", (3 * c, c)), (f"{p}.attn.proj.weight", (c, c)),
                         (f"{p}.attn.proj.bias", (c,)), (f"{p}.attn.lepe.weight", (c, 1, 5, 5)),
                         (f"{p}.attn.lepe.bias", (c,))]
            keys += [(f"{p}.norm2.weight", (c,)), (f"{p}.norm2.bias", (c,)), (f"{p}.mlp.0.weight", (h, c)),
                     (f"{p}.mlp.0.bias", (h,)), (f"{p}.mlp.3.weight", (c, h)), (f"{p}.mlp.3.bias", (c,))]
    bn("norm", embed_dim[-1])
    keys += [("head.weight", (num_classes, embed_dim[-1])), ("head.bias", (num_classes,))]
    return keys


def _sha(lines):
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _layout_state_dict(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """An official-layout tiny checkpoint, as the official training script writes it."""
    layout = official_layout(*OFFICIAL["biformer_tiny"])
    model, ema = _layout_state_dict(layout, 0), _layout_state_dict(layout, 1)
    path = tmp_path_factory.mktemp("ckpt") / "biformer_tiny_best.pth"
    torch.save({"model": model, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "max_accuracy": 81.4, "args": argparse.Namespace(model="biformer_tiny", lr=5e-4)}, path)
    return path, model


@pytest.fixture(scope="module")
def tiny(tiny_file):
    return biformer_tiny(pretrained=tiny_file[0]).eval()


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_layout_and_parameter_counts(name):
    layout = official_layout(*OFFICIAL[name])
    assert _sha(f"{k} {s}" for k, s in layout) == LAYOUT_SHA[name]  # the restatement is the official layout
    assert _sha(sorted(k for k, _ in layout)) == SORTED_KEYS_SHA[name]
    with torch.device("meta"):  # no memory, no init
        model = FACTORIES[name]()
        dense = FACTORIES[name](n_win=16, auto_pad=True, out_indices=(0, 1, 2, 3))
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == layout
    assert len(sd) == ENTRIES[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert sum(p.numel() for p in dense.parameters()) == DENSE_PARAMS[name]
    dense_keys = [k for k in sd if not k.startswith(("norm.", "head."))]
    dense_keys += [f"extra_norms.{i}.{w}" for i in range(4) for w in ("weight", "bias")]
    assert list(dense.state_dict()) == dense_keys  # BiFormer_mm's keys


def test_official_checkpoint_loads_strictly(tiny_file, tiny):
    path, weights = tiny_file
    sd = tiny.state_dict()
    assert list(sd) == list(weights)
    assert all(torch.equal(sd[k], weights[k]) for k in weights)  # 'model', not 'model_ema'
    raw = torch.load(path, weights_only=False)
    assert tiny.load_state_dict(raw["model"], strict=True).missing_keys == []
    # DDP prefix and an explicit key
    prefixed = {"model": {f"module.{k}": v for k, v in raw["model_ema"].items()}}
    assert torch.equal(checkpoint_state_dict(prefixed)["head.bias"], raw["model_ema"]["head.bias"])
    assert torch.equal(checkpoint_state_dict(path, key="model_ema")["head.bias"], raw["model_ema"]["head.bias"])


def test_dense_backbone_loads_classification_checkpoint(tiny_file):
    path, weights = tiny_file
    with torch.device("meta"):
        dense = biformer_tiny(n_win=16, auto_pad=True, out_indices=(1, 2, 3))
    dense = dense.to_empty(device="cpu")
    dense.extra_norms.apply(BiFormer._init_weights)
    result = load_checkpoint(dense, path)  # norm/head dropped, extra_norms keep 1/0, as BiFormer_mm's loader
    assert sorted(result.missing_keys) == sorted(f"extra_norms.{i}.{w}" for i in range(4) for w in ("weight", "bias"))
    assert torch.equal(dense.stages[2][7].attn.qkv.qkv.weight, weights["stages.2.7.attn.qkv.qkv.weight"])
    assert torch.equal(dense.extra_norms[3].weight, torch.ones(512))
    with pytest.raises(RuntimeError, match="unexpected"):
        load_checkpoint(dense, {"model": {**weights, "bogus.weight": weights["norm.weight"]}})


def test_checkpoint_errors(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": fractions.Fraction(1, 3)}, path)  # not allowed by weights_only
    with pytest.raises(RuntimeError, match="weights_only=False"):
        checkpoint_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        checkpoint_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="cannot find the weights"):
        checkpoint_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(ValueError, match="downloads nothing"):
        biformer_tiny(pretrained=True)


# ---- the official math, restated (reads the parameters; plain ops in the official order) --------------------
def _bn(x, bn):
    if bn.training:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _ln(t, ln):
    return F.layer_norm(t, ln.normalized_shape, ln.weight, ln.bias, 1e-6)


def _mhsa(attn, t, lepe):
    """Official Attention / AttentionLePE on NHWC t: always 8 heads, scale (C / 8) ** -0.5, qkv without bias."""
    n, h, w, c = t.shape
    tokens = t.reshape(n, h * w, c)
    q, k, v = F.linear(tokens, attn.qkv.weight).reshape(n, h * w, 3, 8, c // 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * (c // 8) ** -0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, h, w, c)
    if lepe:
        conv = attn.lepe
        out = out + F.conv2d(t.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.kernel_size[0] // 2,
                             groups=c).permute(0, 2, 3, 1)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def _attention(block, t, topk, qk_dim, head_dim):
    if topk > 0:
        assert block.attn.num_heads == qk_dim // head_dim and block.attn.scale == qk_dim ** -0.5  # official
        return official_bra_forward(block.attn, t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if topk < 0:
        return _mhsa(block.attn, t, lepe=topk == -2)
    _, c1, c2, c3, _ = block.attn
    x = t.permute(0, 3, 1, 2)
    x = F.conv2d(F.conv2d(F.conv2d(x, c1.weight, c1.bias), c2.weight, c2.bias, padding=2, groups=x.shape[1]),
                 c3.weight, c3.bias)
    return x.permute(0, 2, 3, 1)


def _mlp(mlp, t):
    t = F.linear(t, mlp[0].weight, mlp[0].bias)
    if not isinstance(mlp[1], torch.nn.Identity):
        conv = mlp[1].dwconv
        t = F.conv2d(t.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=1, groups=t.shape[-1]).permute(0, 2, 3, 1)
    return F.linear(F.gelu(t), mlp[3].weight, mlp[3].bias)


def _block(block, x, topk, qk_dim, head_dim, pre_norm):
    c = x.shape[1]
    if block.pos_embed is not None:
        k = block.pos_embed.kernel_size[0]
        x = x + F.conv2d(x, block.pos_embed.weight, block.pos_embed.bias, padding=k // 2, groups=c)
    x = x.permute(0, 2, 3, 1)
    g1, g2 = (block.gamma1, block.gamma2) if block.use_layer_scale else (1.0, 1.0)
    if pre_norm:
        x = x + g1 * _attention(block, _ln(x, block.norm1), topk, qk_dim, head_dim)
        x = x + g2 * _mlp(block.mlp, _ln(x, block.norm2))
    else:
        x = _ln(x + g1 * _attention(block, x, topk, qk_dim, head_dim), block.norm1)
        x = _ln(x + g2 * _mlp(block.mlp, x), block.norm2)
    return x.permute(0, 3, 1, 2)


def official_forward(model, x, cfg):
    """The official BiFormer.forward (or BiFormer_mm.forward with out_indices), restated."""
    qk_dims = [q or c for q, c in zip(cfg.get("qk_dims", (None,) * 4), cfg["embed_dim"])]
    outs = []
    for i in range(4):
        layer = model.downsample_layers[i]
        if i == 0:
            x = _bn(F.conv2d(x, layer[0].weight, layer[0].bias, stride=2, padding=1), layer[1])
            x = _bn(F.conv2d(F.gelu(x), layer[3].weight, layer[3].bias, stride=2, padding=1), layer[4])
        else:
            x = _bn(F.conv2d(x, layer[0].weight, layer[0].bias, stride=2, padding=1), layer[1])
        for block in model.stages[i]:
            x = _block(block, x, cfg["topks"][i], qk_dims[i], cfg["head_dim"], cfg.get("pre_norm", True))
        if model.extra_norms is not None:
            norm = model.extra_norms[i]
            outs.append(F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                                     1e-6).permute(0, 3, 1, 2))
    if model.extra_norms is not None:
        return [outs[i] for i in model.out_indices]
    x = _bn(x, model.norm).flatten(2).mean(-1)
    if not isinstance(model.pre_logits, torch.nn.Identity):  # working representation_size (official: TypeError)
        x = torch.tanh(F.linear(x, model.pre_logits.fc.weight, model.pre_logits.fc.bias))
    return F.linear(x, model.head.weight, model.head.bias)


# official factory settings, small: BRA heads qk // 4 = 4, 8, 12; stage 3 uses 8 heads, not 64 // 4 = 16
CFG_OFFICIAL = dict(depth=(1, 1, 2, 1), embed_dim=(16, 32, 48, 64), qk_dims=(16, 32, 48, 64), head_dim=4, n_win=2,
                    topks=(1, 2, 4, -2), kv_downsample_mode="identity", kv_per_wins=(-1, -1, -1, -1),
                    mlp_ratios=(3, 3, 3, 3), auto_pad=True, num_classes=7)
# every other option: conv / plain attention stages, post-norm, layer scale, MLP dwconv, 'qkv', pooled kv,
# qk_dim != dim, a 5x5 position conv (officially broken), representation_size (officially broken)
CFG_OPTIONS = dict(depth=(1, 1, 1, 1), embed_dim=(16, 24, 32, 40), qk_dims=(8, None, None, None), head_dim=4,
                   n_win=2, topks=(2, 0, -1, -2), kv_downsample_mode="ada_avgpool", kv_per_wins=(2, 2, -1, -1),
                   mlp_ratios=(2, 3, 2, 4), auto_pad=True, num_classes=5, pre_norm=False,
                   layer_scale_init_value=0.5, mlp_dwconv=True, param_attention="qkv", before_attn_dwconv=5,
                   side_dwconv=3, representation_size=12)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "gamma" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def _outputs_and_grads(fn, model, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    loss = sum(o.square().mean() for o in out) if isinstance(out, list) else out.square().sum()
    return out, torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True, materialize_grads=True)


def _close(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
        return
    torch.testing.assert_close(a, b, atol=2e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("cfg, size, train, out_indices", [
    (CFG_OFFICIAL, (37, 45), False, None),  # stage maps 10x12, 5x6, 3x3: padded in stages 1 and 2
    (CFG_OFFICIAL, (32, 29), True, None),  # training mode: BatchNorm batch statistics
    (CFG_OFFICIAL, (41, 35), False, (0, 2, 3)),  # the dense backbone
    (CFG_OPTIONS, (35, 40), False, None),
], ids=["official", "official-train", "dense", "options"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_network_matches_official_math(cfg, size, train, out_indices, backend):
    model = BiFormer(**cfg, out_indices=out_indices).train(train)
    _randomize(model, 1)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with use_backend(backend):
        out, grads = _outputs_and_grads(model, model, x)
    ref, ref_grads = _outputs_and_grads(lambda t: official_forward(model, t, cfg), model, x)
    _close(out, ref)
    for a, b in zip(grads, ref_grads):
        _close(a, b)
    if out_indices is not None:
        assert [tuple(o.shape) for o in out] == [(2, 16, 11, 9), (2, 48, 3, 3), (2, 64, 2, 2)]
    else:
        assert out.shape == (2, cfg["num_classes"])


def test_tiny_logits_match_official_math(tiny):
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))  # stage maps 28, 14, 7: n_win=7 fits
    with torch.no_grad():
        out = tiny(x)
        ref = official_forward(tiny, x, dict(embed_dim=(64, 128, 256, 512), topks=(1, 4, 16, -2), head_dim=32))
    torch.testing.assert_close(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    assert [tiny.stages[i][0].attn.num_heads for i in range(4)] == [2, 4, 8, 8]


def test_init_weights_as_official():
    model = BiFormer(**CFG_OFFICIAL)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert (m.bias is None or torch.all(m.bias == 0)) and 0.015 < m.weight.std() < 0.025 and m.weight.abs().max() < 0.2
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    torch.manual_seed(5)
    a = BiFormer(**CFG_OFFICIAL).state_dict()
    torch.manual_seed(5)
    b = BiFormer(**CFG_OFFICIAL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- dense prediction, input sizes, heads, classifier --------------------------------------------------------
def test_tiny_dense_detection_settings():
    model = biformer_tiny(n_win=16, auto_pad=True, out_indices=(1, 2, 3)).eval()
    with torch.device("meta"):
        dense = biformer_dense("tiny", out_indices=(1, 2, 3))
    assert dense.n_win == 16 and dense.auto_pad and dense.norm_eval and list(dense.state_dict()) == list(model.state_dict())
    calls = []
    model.stages[3].register_forward_hook(lambda *_: calls.append(3))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 61, 94))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert calls == [3] and all(f.is_contiguous() for f in feats)
    early = BiFormer(**CFG_OFFICIAL, out_indices=(0, 1))
    early.stages[2].register_forward_hook(lambda *_: calls.append(2))
    with torch.no_grad():
        assert [tuple(f.shape) for f in early(torch.randn(1, 3, 64, 64))] == [(1, 16, 16, 16), (1, 32, 8, 8)]
    assert calls == [3]  # stages after the last index are not run
    # norm_eval: BatchNorms stay in eval mode; train() returns the module (BiFormer_mm's returned None)
    assert dense.train() is dense and not dense.downsample_layers[0][1].training and dense.stages[0].training


def test_classifier_helpers_and_input_checks():
    model = BiFormer(**CFG_OFFICIAL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 48, 4, 4), (2, 64, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, 64)
        model.reset_classifier(3)  # officially a TypeError
        assert model(x).shape == (2, 3) and model.num_features == 64 and model.embed_dim == [16, 32, 48, 64]
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 64, 2, 2)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(channels_last), model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x).float()).all()
    assert BiFormer(**CFG_OFFICIAL, mhsa_num_heads=None).stages[3][0].attn.num_heads == 16
    with torch.device("meta"):
        default = BiFormer()  # officially a TypeError (qk_dims None)
    assert [default.stages[i][0].attn.num_heads for i in range(4)] == [1, 2, 8, 8]
    strict = BiFormer(**dict(CFG_OFFICIAL, auto_pad=False))
    with pytest.raises(ValueError, match=r"\(60, 64\).*stage 0.*auto_pad=True"):
        strict(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        strict(torch.randn(1, 4, 64, 64))


def test_gradient_checkpointing_gives_equal_gradients():
    cfg = dict(CFG_OFFICIAL, drop_path_rate=0.3)
    plain = BiFormer(**cfg).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True, stages=(0, 2, 3))
    assert list(BiFormer(**cfg, use_checkpoint_stages=(0, 2)).state_dict()) == list(plain.state_dict())
    calls = []
    ckpt.stages[2].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 37, 45)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(11)  # the same drop-path masks (checkpoint restores the RNG state when recomputing)
        results.append(_outputs_and_grads(model, model, x))
    assert len(calls) == 2  # forward + recomputation
    _close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        _close(a, b)
    for a, b in zip(plain.buffers(), ckpt.buffers()):  # BatchNorm statistics updated once
        assert torch.equal(a, b)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_mlp_checkpointing_gives_equal_gradients(pre_norm):
    from yoloattn.nn.biformer import BiFormerBlock

    cfg = dict(CFG_OFFICIAL, drop_path_rate=0.3)
    plain = BiFormer(**cfg).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True, granularity="mlp")
    assert all(block.checkpoint_mlp for stage in ckpt.stages for block in stage)
    calls = []
    ckpt.stages[1][0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 37, 45)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        results.append(_outputs_and_grads(model, model, x))
    assert len(calls) == 2  # forward + recomputation
    _close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        _close(a, b)
    block = BiFormerBlock(16, num_heads=2, n_win=2, topk=2, pre_norm=pre_norm, auto_pad=True, drop_path=0.2).train()
    twin = copy.deepcopy(block)
    twin.checkpoint_mlp = True
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    grads = []
    for b in (block, twin):
        torch.manual_seed(3)
        out = b(x)
        grads.append((out, *torch.autograd.grad(out.square().sum(), [x, *b.parameters()])))
    for a, b in zip(*grads):
        _close(a, b)
    with pytest.raises(ValueError, match="granularity must be one of"):
        ckpt.set_grad_checkpointing(True, granularity="block")


# ---- timm ------------------------------------------------------------------------------------------------------
def test_register_timm_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models", None)
    assert register_timm() is False
    with pytest.raises(ImportError, match="pip install timm"):
        register_timm(strict=True)


@pytest.fixture(scope="module")
def timm():
    timm = pytest.importorskip("timm")
    assert register_timm() is True and register_timm() is True  # idempotent
    return timm


SMALL_TINY = dict(depth=(1, 1, 1, 1))  # the tiny's widths, one block per stage (fast)


def test_timm_create_model(timm):
    assert {"biformer_tiny", "biformer_small", "biformer_base"} <= set(timm.list_models("biformer*"))
    with torch.device("meta"):
        model = timm.create_model("biformer_base", drop_path_rate=0.3, drop_rate=0.1)
    assert sum(p.numel() for p in model.parameters()) == PARAMS["biformer_base"]
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["classifier"] == "head"
    with pytest.raises(ValueError, match="downloads nothing.*pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("biformer_tiny", pretrained=True)


def test_timm_features_only(timm):
    model = timm.create_model("biformer_tiny", features_only=True, out_indices=(1, 2, 3), **SMALL_TINY).eval()
    assert model.feature_info.channels() == [128, 256, 512] and model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]
    early = timm.create_model("biformer_tiny", features_only=True, out_indices=(0, 1), auto_pad=True, **SMALL_TINY)
    keys = list(early.state_dict())
    assert all(k.startswith("model.") for k in keys) and not any(k.startswith("model.stages.2") for k in keys)
    assert not any(k.startswith(("model.head", "model.norm")) for k in keys)
    with torch.no_grad():
        assert [tuple(f.shape) for f in early(torch.randn(1, 3, 50, 70))] == [(1, 64, 13, 18), (1, 128, 7, 9)]


def test_timm_pretrained_local_file(timm, tmp_path):
    source = biformer_tiny(**SMALL_TINY)
    _randomize(source, 4)
    weights = source.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    path = tmp_path / "biformer_tiny_best.pth"
    torch.save({"model": weights, "model_ema": ema, "args": argparse.Namespace(lr=5e-4)}, path)
    overlay = dict(file=str(path))
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL_TINY)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], weights[k]) for k in weights)  # 'model', not timm's preferred 'model_ema'
    assert model.pretrained_cfg.get("state_dict") is None and model.pretrained_cfg["file"] == str(path)
    ten = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10,
                            **SMALL_TINY)
    assert ten.head.out_features == 10 and torch.equal(ten.norm.weight, weights["norm.weight"])
    feats = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                              out_indices=(1, 2, 3), **SMALL_TINY)
    assert torch.equal(feats.state_dict()["model.stages.3.0.attn.proj.weight"], weights["stages.3.0.attn.proj.weight"])


# ---- bad configurations ----------------------------------------------------------------------------------------
BAD = [
    (dict(depth=(1, 1, 1)), ValueError, r"depth must be a list of 4 entries.*\(1, 1, 1\)"),
    (dict(depth=(1, 1, -1, 1)), ValueError, r"depth\[2\] must be an integer >= 0, got -1"),
    (dict(embed_dim=(1, 32, 48, 64)), ValueError, r"embed_dim\[0\] must be >= 2.*got 1"),
    (dict(topks=(1, 2, 4, -3)), ValueError, r"topks\[3\] must be .*got -3"),
    (dict(topks=(1, 2, 5, -2)), ValueError, r"topk must be .*got 5"),
    (dict(qk_dims=(2, 32, 48, 64)), ValueError, r"qk_dims\[0\]=2 gives no head with head_dim=4"),
    (dict(mlp_ratios=(3, 3, 0, 3)), ValueError, r"mlp_ratios\[2\] must be a positive number, got 0"),
    (dict(pe="sum"), ValueError, r"pe must be None or 'none'.*'sum'"),
    (dict(use_checkpoint_stages=(4,)), ValueError, r"use_checkpoint_stages\[0\] must be a stage index.*got 4"),
    (dict(out_indices=(1, 1)), ValueError, r"out_indices must be increasing.*\[1, 1\]"),
    (dict(out_indices=(0, 5)), ValueError, r"indices must hold stage indices.*\[0, 5\]"),
    (dict(drop_path_rate=1.0), ValueError, r"drop_path_rate must be .*1.0"),
    (dict(num_classes=-1), ValueError, r"num_classes must be .*got -1"),
    (dict(in_chans=0), ValueError, r"in_chans must be .*got 0"),
    (dict(global_pool="max"), ValueError, r"global_pool must be .*'max'"),
    (dict(global_pool=""), ValueError, r"global_pool='' \(no pooling\) needs num_classes=0.*7"),
    (dict(mhsa_num_heads=0), ValueError, r"mhsa_num_heads must be .*got 0"),
    (dict(n_win=0), ValueError, r"n_win must be .*got 0"),
    (dict(before_attn_dwconv=4), ValueError, r"before_attn_dwconv must be .*got 4"),
    (dict(kv_downsample_mode="conv"), ValueError, r"kv_downsample_mode must be one of .*'conv'"),
    (dict(kv_downsample_mode="ada_avgpool"), ValueError, r"kv_per_win must be .*got -1"),
    (dict(auto_pad=1), TypeError, r"auto_pad must be .*got 1"),
    (dict(embed_dim=(16, 32, 48, 60)), ValueError, r"dim=60.*num_heads=8"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[next(iter(k)) for k, _, _ in BAD])
def test_bad_configurations_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        BiFormer(**dict(CFG_OFFICIAL, **kwargs))


def test_bad_factory_and_method_arguments():
    with pytest.raises(TypeError, match="pretrained must be False or a checkpoint path"):
        biformer_tiny(pretrained=3)
    with pytest.raises(ValueError, match=r"variant must be .*'large'"):
        biformer_dense("large")
    dense = BiFormer(**CFG_OFFICIAL, out_indices=(1,))
    with pytest.raises(ValueError, match="dense backbone"):
        dense.reset_classifier(3)
    with pytest.raises(ValueError, match=r"output_fmt must be 'NCHW', got 'NHWC'"):
        dense.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["yolov8n-c2f-biformer.yaml",
                                  pytest.param("yolov8n-biformer.yaml", marks=pytest.mark.slow),
                                  pytest.param("yolo11n-c3k2-biformer.yaml", marks=pytest.mark.slow)])
def test_yolo_onnx_dynamic_matches_onnxruntime(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ultralytics writes a YAML model's export to the working directory
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from yoloattn import YOLO

    model = YOLO(name)
    net = model.model.float().eval()
    path = model.export(format="onnx", imgsz=128, dynamic=True, simplify=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = net(x)
        while isinstance(expected, (list, tuple)):
            expected = expected[0]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=2e-3, rtol=1e-3, err_msg=str(shape))
