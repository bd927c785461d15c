"""Sweep the Triton partials kernel's launch configuration on a GPU.

    python bench/triton_tune.py [--out FILE.json] [--tiny]

For each case of the benchmark (a large fp32 list, bf16 gradients with fp32 params and x*,
K = 8 gradient lists, 10^4 small tensors) and each configuration (warps per program 2, 4, 8,
16, which sets the step BLOCK = V x 32 x warps; software-pipelining stages: Triton's default,
1, 2, 3, 4), times ``secant_stats`` / ``secant_stats_multi`` with backend="triton" (CUDA
events, median of ``--repeats`` after a warm-up that also compiles), checks the result against
the compiled CUDA kernel or the fp64 reference (within 1e-6), and prints the time, GB/s and
the best configuration per case; ``--out`` writes all rows and the best ones with the device
and versions. The configuration is set through ``triton_kernels.NUM_WARPS`` and
``NUM_STAGES`` (the shipped defaults: 4 warps, Triton's default stages); a better one found
here is what to ship, for the device it was found on.

``--tiny`` runs every configuration once at test sizes, on CPU tensors under the Triton
interpreter when no GPU is visible (correctness only: the tests run it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pathgeom_fast as pg  # noqa: E402
from pathgeom_fast import bench, triton_kernels as tk  # noqa: E402

WARPS = (2, 4, 8, 16)
STAGES = (None, 1, 2, 3, 4)


def cases(tiny: bool) -> dict:
    f32, mixed = (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32)
    if tiny:
        return {"large_fp32": (bench.model_like_sizes(70_000, n=3), f32, 1),
                "large_bf16g_fp32": (bench.model_like_sizes(70_000, n=3), mixed, 1),
                "multi_k8_fp32": (bench.model_like_sizes(20_000, n=3), f32, 8),
                "small_fp32": ([100] * 20, f32, 1)}
    return {"large_fp32": (bench.model_like_sizes(10**8), f32, 1),
            "large_bf16g_fp32": (bench.model_like_sizes(10**8), mixed, 1),
            "multi_k8_fp32": (bench.model_like_sizes(2 * 10**7), f32, 8),
            "small_10k_fp32": ([1000] * 10_000, f32, 1)}


def run_op(inputs, K):
    grads, params, refs = inputs
    if K == 1:
        return pg.secant_stats(grads, params, refs, backend="triton")
    return pg.secant_stats_multi(grads, params, refs, backend="triton")


def reference(inputs, K, device):
    grads, params, refs = inputs
    if device.type == "cuda" and pg.extension_available():  # the CUDA kernel, checked by its own tests
        return (pg.secant_stats(grads, params, refs, backend="cuda") if K == 1
                else pg.secant_stats_multi(grads, params, refs, backend="cuda"))
    lists = [grads] if K == 1 else grads
    rows = torch.stack([pg.reference_secant_stats(g, params, refs) for g in lists])
    return rows[0] if K == 1 else rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="test sizes, one timed call per configuration")
    ap.add_argument("--warps", type=int, nargs="+", default=list(WARPS), help=f"warps per program (default: {WARPS})")
    ap.add_argument("--stages", nargs="+", default=[str(s).lower() for s in STAGES],
                    help="pipelining stages; none: Triton's default (default: none 1 2 3 4)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 1 if args.tiny else args.repeats
    stages_list = [None if v.lower() == "none" else int(v) for v in args.stages]
    saved = (tk.NUM_WARPS, tk.NUM_STAGES, tk.INTERPRET_WARPS)
    rows = []
    try:
        for name, (sizes, dtypes, K) in cases(args.tiny).items():
            inputs = bench.make_inputs(sizes, dtypes, device, K=K)
            want = reference(inputs, K, device)
            nbytes = bench.nbytes(*inputs)
            for warps in args.warps:
                for stages in stages_list:
                    tk.NUM_WARPS, tk.NUM_STAGES = warps, stages
                    if tk.INTERPRET:
                        tk.INTERPRET_WARPS = warps
                    got = run_op(inputs, K)  # warm-up (and compilation)
                    err = bench.rel_error(got, want)
                    times = [bench.time_once(run_op, (inputs, K), device) for _ in range(repeats)]
                    ms = statistics.median(times) * 1e3
                    rows.append({"case": name, "num_warps": warps, "num_stages": stages, "ms": ms,
                                 "gbps": nbytes / (ms / 1e3) / 1e9, "rel_err": err, "ok": err <= 1e-6})
                    print(f"{name:<18} warps {warps:>2} stages {str(stages):>4}  {ms:9.3f} ms  "
                          f"{rows[-1]['gbps']:8.1f} GB/s  rel err {err:.1e}", flush=True)
            del inputs
    finally:
        tk.NUM_WARPS, tk.NUM_STAGES, tk.INTERPRET_WARPS = saved
    best = {}
    for r in rows:
        if r["ok"] and (r["case"] not in best or r["ms"] < best[r["case"]]["ms"]):
            best[r["case"]] = r
    print("best per case (shipped: 4 warps, Triton's default stages):")
    for name, r in best.items():
        default = next((d for d in rows if d["case"] == name and d["num_warps"] == 4 and d["num_stages"] is None), None)
        vs = f", {default['ms'] / r['ms']:.2f}x the shipped configuration" if default else ""
        print(f"  {name:<18} warps {r['num_warps']:>2} stages {str(r['num_stages']):>4}: {r['ms']:.3f} ms{vs}")
    env = bench.environment(device)
    out = {"environment": env, "rows": rows, "best": best}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
