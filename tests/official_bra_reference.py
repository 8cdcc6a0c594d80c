"""Test-only re-statement of BiFormer's released BRA forward (its bra_legacy math).

It reads the parameters of a :class:`yoloattn.BiLevelRoutingAttention` and recomputes the
output the way the official code does, step by step in its own layout (window-partition first, then
the qkv projection, einops reshapes, expand+gather, explicit softmax), so the whole layer
(padding, projections, pooling, routing, LePE, cropping) is checked against an independent
statement of the math, not only the attention kernel.
"""

import torch
import torch.nn.functional as F
from einops import rearrange


def official_bra_forward(layer, x, ret_attn_mask=False):
    """x: (N, C, H, W) -> (N, C, H, W), or (out NCHW, r_weight, r_idx, attn) like the layer."""
    n_win, qk_dim, dim, heads = layer.n_win, layer.qk_dim, layer.dim, layer.num_heads
    x = rearrange(x, "n c h w -> n h w c")
    _, h_in, w_in, _ = x.shape
    pad_r = (n_win - w_in % n_win) % n_win
    pad_b = (n_win - h_in % n_win) % n_win
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, H, W, _ = x.shape
    x = rearrange(x, "n (j h) (i w) c -> n (j i) h w c", j=n_win, i=n_win)

    q, kv = F.linear(x, layer.qkv.qkv.weight, layer.qkv.qkv.bias).split([qk_dim, qk_dim + dim], dim=-1)
    q_pix = rearrange(q, "n p2 h w c -> n p2 (h w) c")
    kv_pix = layer.kv_down(rearrange(kv, "n p2 h w c -> (n p2) c h w"))
    kv_pix = rearrange(kv_pix, "(n j i) c h w -> n (j i) (h w) c", j=n_win, i=n_win)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk_dim].mean([2, 3])

    if layer.lepe is not None:
        v_img = rearrange(kv[..., qk_dim:], "n (j i) h w c -> n c (j h) (i w)", j=n_win, i=n_win)
        lepe = rearrange(layer.lepe(v_img), "n c (j h) (i w) -> n (j h) (i w) c", j=n_win, i=n_win)
    else:
        lepe = 0.0

    # router (fp32, like yoloattn; the official code used the input dtype)
    if not layer.diff_routing:
        q_win, k_win = q_win.detach(), k_win.detach()
    q_hat, k_hat = layer.router.emb(q_win.float()), layer.router.emb(k_win.float())
    logits = (q_hat * layer.scale) @ k_hat.transpose(-2, -1)
    topk_logits, r_idx = torch.topk(logits, k=layer.topk, dim=-1)
    r_weight = torch.softmax(topk_logits, dim=-1)

    n, p2, w2, c_kv = kv_pix.shape
    topk = r_idx.shape[-1]
    kv_sel = torch.gather(kv_pix.view(n, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1), dim=2,
                          index=r_idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c_kv))
    if layer.soft_routing:
        kv_sel = r_weight.view(n, p2, topk, 1, 1).to(kv_sel.dtype) * kv_sel
    k_sel, v_sel = kv_sel.split([qk_dim, dim], dim=-1)
    k_sel = rearrange(k_sel, "n p2 k w2 (m c) -> (n p2) m c (k w2)", m=heads)
    v_sel = rearrange(v_sel, "n p2 k w2 (m c) -> (n p2) m (k w2) c", m=heads)
    q_pix = rearrange(q_pix, "n p2 w2 (m c) -> (n p2) m w2 c", m=heads)
    attn = torch.softmax((q_pix * layer.scale) @ k_sel, dim=-1)
    out = attn @ v_sel
    out = rearrange(out, "(n j i) m (h w) c -> n (j h) (i w) (m c)", j=n_win, i=n_win, h=H // n_win, w=W // n_win)
    out = layer.wo(out + lepe)
    out = out[:, :h_in, :w_in, :]
    out = rearrange(out, "n h w c -> n c h w")
    if ret_attn_mask:
        return out, r_weight, r_idx, attn
    return out
