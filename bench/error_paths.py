"""Error paths of the compiled extension, each in its own subprocess: a crash shows as a
return code instead of ending the run.

    python bench/error_paths.py        (a step of bench/gpu.sh)

Why: on the first H100 run (2026-11-27, torch 2.11, Python 3.12, gcc 13.3, the CUDA build) a
bad-input call of the C++ entry point segfaulted (tests/test_ops.py::
test_bad_inputs_name_the_offender[cpu]); not reproduced on the project's CPU machine. Every
probe must end with rc=0 and the expected exception type. Exit status: the number of probes
that did not.
"""
import subprocess
import sys

PRE = (
    "import torch, pathgeom_fast as pg; from pathgeom_fast import _ext; "
    "g=[torch.randn(n) for n in (4,6,8)]; x=[torch.randn(n) for n in (4,6,8)]; r=[torch.randn(n) for n in (4,6,8)]\n"
)
D = "_ext._C.secant_stats_direct"
PROBES = {  # name: (code, expected exception type or None)
    "dispatcher_lengths": ("torch.ops.pathgeom.secant_stats(g, x, r[:2])", "ValueError"),
    "direct_lengths": (f"{D}(g, x, r[:2], 1, False, 0.0, 0)", "ValueError"),
    "direct_numel": (f"{D}([g[0], torch.randn(5), g[2]], x, r, 1, False, 0.0, 0)", "ValueError"),
    "direct_none": (f"{D}([None, g[1], g[2]], x, r, 1, False, 0.0, 0)", "ValueError"),
    "direct_dtype": (f"{D}(g, [torch.ones(4, dtype=torch.long), x[1], x[2]], r, 1, False, 0.0, 0)", "TypeError"),
    "direct_gram_lengths": (f"{D}(g, x, r[:2], 1, False, 0.0, 2)", "ValueError"),
    "triton_inputs_lengths": ("_ext._C.triton_inputs(g, x, r[:2], 1, False)", "ValueError"),
    "api_cpu_lengths": ("pg.secant_stats(g, x, r[:2], backend='cpu')", "ValueError"),
    "direct_ok": (f"print({D}(g, x, r, 1, False, 0.0, 0).tolist())", None),
}


def main() -> int:
    bad = 0
    for name, (code, expected) in PROBES.items():
        src = PRE + "try:\n    " + code + "\nexcept Exception as e:\n    print('raised', type(e).__name__, str(e)[:120])"
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", src], capture_output=True, text=True, timeout=120)
        out = p.stdout.strip()
        ok = p.returncode == 0 and (out.startswith(f"raised {expected} ") if expected else not out.startswith("raised"))
        bad += not ok
        tail = "" if p.returncode == 0 else " | " + p.stderr.strip()[-400:].replace("\n", " / ")
        print(f"{'ok ' if ok else 'BAD'} {name:22s} rc={p.returncode} {out[:160]}{tail}")
    print(f"{len(PROBES) - bad} of {len(PROBES)} error paths as expected")
    return bad


if __name__ == "__main__":
    sys.exit(main())
