"""Test-only re-statement of DAT's DAttentionBaseline.forward (the official code path, DAT's grids).

It reads a :class:`yoloattn.nn.dat.DAttentionBaseline`'s parameters and recomputes the outputs
with the official code's own steps: grids built in place in the input dtype, (y, x) order with index
shuffles, einsum attention, explicit softmax. Valid where the official code is (H, W, Hk, Wk > 1).
"""

import einops
import numpy as np
import torch
import torch.nn.functional as F


def _ref_points(h_key, w_key, b, dtype, device):
    ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h_key - 0.5, h_key, dtype=dtype, device=device),
                                  torch.linspace(0.5, w_key - 0.5, w_key, dtype=dtype, device=device), indexing="ij")
    ref = torch.stack((ref_y, ref_x), -1)
    ref[..., 1].div_(w_key - 1.0).mul_(2.0).sub_(1.0)
    ref[..., 0].div_(h_key - 1.0).mul_(2.0).sub_(1.0)
    return ref[None, ...].expand(b, -1, -1, -1)


def _q_grid(h, w, b, dtype, device):
    ref_y, ref_x = torch.meshgrid(torch.arange(0, h, dtype=dtype, device=device),
                                  torch.arange(0, w, dtype=dtype, device=device), indexing="ij")
    ref = torch.stack((ref_y, ref_x), -1)
    ref[..., 1].div_(w - 1.0).mul_(2.0).sub_(1.0)
    ref[..., 0].div_(h - 1.0).mul_(2.0).sub_(1.0)
    return ref[None, ...].expand(b, -1, -1, -1)


def official_dat_forward(m, x):
    B, C, H, W = x.size()
    dtype, device = x.dtype, x.device
    q = m.proj_q(x)
    q_off = einops.rearrange(q, "b (g c) h w -> (b g) c h w", g=m.n_groups, c=m.n_group_channels)
    offset = m.conv_offset(q_off).contiguous()
    Hk, Wk = offset.size(2), offset.size(3)
    n_sample = Hk * Wk
    if m.offset_range_factor >= 0 and not m.no_off:
        offset_range = torch.tensor([1.0 / (Hk - 1.0), 1.0 / (Wk - 1.0)], device=device).reshape(1, 2, 1, 1)
        offset = offset.tanh().mul(offset_range).mul(m.offset_range_factor)
    offset = einops.rearrange(offset, "b p h w -> b h w p")
    reference = _ref_points(Hk, Wk, B * m.n_groups, dtype, device)
    if m.no_off:
        offset = torch.zeros_like(offset)
    if m.offset_range_factor >= 0:
        pos = offset + reference
    else:
        pos = (offset + reference).clamp(-1.0, +1.0)
    if m.no_off:
        x_sampled = F.avg_pool2d(x, kernel_size=m.stride, stride=m.stride)
    else:
        x_sampled = F.grid_sample(input=x.reshape(B * m.n_groups, m.n_group_channels, H, W), grid=pos[..., (1, 0)],
                                  mode="bilinear", align_corners=True)
    x_sampled = x_sampled.reshape(B, C, 1, n_sample)
    q = q.reshape(B * m.n_heads, m.n_head_channels, H * W)
    k = m.proj_k(x_sampled).reshape(B * m.n_heads, m.n_head_channels, n_sample)
    v = m.proj_v(x_sampled).reshape(B * m.n_heads, m.n_head_channels, n_sample)
    attn = torch.einsum("b c m, b c n -> b m n", q, k).mul(m.scale)
    residual_lepe = None
    if m.use_pe and not m.no_off:
        if m.dwc_pe:
            residual_lepe = m.rpe_table(q.reshape(B, C, H, W)).reshape(B * m.n_heads, m.n_head_channels, H * W)
        elif m.fixed_pe:
            attn = attn + m.rpe_table[None, ...].expand(B, -1, -1, -1).reshape(B * m.n_heads, H * W, n_sample)
        elif m.log_cpb:
            q_grid = _q_grid(H, W, B * m.n_groups, dtype, device)
            displacement = (q_grid.reshape(B * m.n_groups, H * W, 2).unsqueeze(2)
                            - pos.reshape(B * m.n_groups, n_sample, 2).unsqueeze(1)).mul(4.0)
            displacement = torch.sign(displacement) * torch.log2(torch.abs(displacement) + 1.0) / np.log2(8.0)
            attn_bias = m.rpe_table(displacement)
            attn = attn + einops.rearrange(attn_bias, "b m n h -> (b h) m n", h=m.n_group_heads)
        else:
            rpe_bias = m.rpe_table[None, ...].expand(B, -1, -1, -1)
            q_grid = _q_grid(H, W, B * m.n_groups, dtype, device)
            displacement = (q_grid.reshape(B * m.n_groups, H * W, 2).unsqueeze(2)
                            - pos.reshape(B * m.n_groups, n_sample, 2).unsqueeze(1)).mul(0.5)
            attn_bias = F.grid_sample(
                input=einops.rearrange(rpe_bias, "b (g c) h w -> (b g) c h w", c=m.n_group_heads, g=m.n_groups),
                grid=displacement[..., (1, 0)], mode="bilinear", align_corners=True)
            attn = attn + attn_bias.reshape(B * m.n_heads, H * W, n_sample)
    attn = F.softmax(attn, dim=2)
    out = torch.einsum("b m n, b c n -> b c m", attn, v)
    if residual_lepe is not None:
        out = out + residual_lepe
    y = m.proj_out(out.reshape(B, C, H, W))
    return y, pos.reshape(B, m.n_groups, Hk, Wk, 2), reference.reshape(B, m.n_groups, Hk, Wk, 2)
