"""Host-side cost of one Triton-backend call for many small tensors, kernels left out.

    TRITON_INTERPRET=1 python bench/triton_host_cost.py [--tensors 10000]

Runs anywhere (CPU tensors under the interpreter; the kernel launches are replaced by no-ops):
what remains is the Python and C++ work before the launches (checks, address tables, plan,
argument buffer). Prints it with and without the compiled extension's C++ pass
(``_C.triton_inputs``). On a GPU this cost adds to the kernels' time unless it overlaps them.
"""
import argparse
import os
import time

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import pathgeom_fast as pg  # noqa: E402
from pathgeom_fast import triton_kernels as tk  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=10000)
    ap.add_argument("--numel", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    tk._partials_kernel = _NoLaunch()
    tk._segment_sum_kernel = _NoLaunch()
    device = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
    lists = [[torch.randn(args.numel, device=device) for _ in range(args.tensors)] for _ in range(3)]
    call = lambda: pg.secant_stats(*lists, backend="triton")  # noqa: E731
    with_ext = median_ms(call, args.repeats) if tk.checks_inputs() else float("nan")
    original = tk.checks_inputs
    tk.checks_inputs = lambda: False
    try:
        without = median_ms(call, args.repeats)
    finally:
        tk.checks_inputs = original
    print(f"{args.tensors} tensors of {args.numel} elements on {device}: host work of one Triton call "
          f"{with_ext:.2f} ms with the C++ pass, {without:.2f} ms in Python (median of {args.repeats})")


if __name__ == "__main__":
    main()
