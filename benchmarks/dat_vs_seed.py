"""DAT forward: the seed module's code path vs yoloattn's reference and fast paths, same outputs checked.

The issue's case: x (1, 64, 80, 80), stride 8, 2 heads of 32 channels, 1 offset group, the default
position table at q_size 80, 2 threads. The seed's forward is restated in tests/seed_dat_reference.py
(its in-place grids, index shuffles and einsums), reading the same module's parameters.

    python benchmarks/dat_vs_seed.py
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from seed_dat_reference import seed_dat_forward  # noqa: E402

from yoloattn import use_backend  # noqa: E402
from yoloattn.bench.measure import median_ms  # noqa: E402
from yoloattn.nn.dat import DAttentionBaseline  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = DAttentionBaseline(q_size=(80, 80), kv_size=(10, 10), n_heads=2, n_head_channels=32, n_groups=1,
                               attn_drop=0.0, proj_drop=0.0, stride=8, offset_range_factor=-1, use_pe=True,
                               dwc_pe=False, no_off=False, fixed_pe=False, ksize=9, log_cpb=False).eval()
    with torch.no_grad():
        layer.rpe_table.normal_(0, 0.5)
    x = torch.randn(1, 64, 80, 80)
    device = torch.device("cpu")
    with torch.no_grad():
        seed_out = seed_dat_forward(layer, x)
        for backend in ("reference", "fast"):
            with use_backend(backend):
                out = layer(x)
            diff = max((a - b).abs().max().item() for a, b in zip(out, seed_out))
            print(f"{backend}: max |difference| to the seed's (y, pos, reference): {diff:.2e}")
        print(f"threads={args.threads} torch={torch.__version__}")
        print("| round | seed fwd ms | reference fwd ms | fast fwd ms | seed / fast |")
        print("|---|---|---|---|---|")
        for r in range(args.rounds):
            seed_ms = median_ms(lambda: seed_dat_forward(layer, x), device, budget_s=3, max_reps=100)
            with use_backend("reference"):
                ref_ms = median_ms(lambda: layer(x), device, budget_s=3, max_reps=100)
            with use_backend("fast"):
                fast_ms = median_ms(lambda: layer(x), device, budget_s=3, max_reps=100)
            print(f"| {r + 1} | {seed_ms:.1f} | {ref_ms:.1f} | {fast_ms:.1f} | {seed_ms / fast_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
