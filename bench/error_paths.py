"""Error paths of the compiled extension, each in its own subprocess: a crash shows as a
return code instead of ending the run.

    python bench/error_paths.py                 (a step of bench/gpu.sh)
    python bench/error_paths.py --in-process    (all probes in this process, one after the
                                                 other: under gdb, a crash stops at its frame)

Why: on the first H100 run (2026-11-27, torch 2.11, Python 3.12, gcc 13.3, the CUDA build) a
bad-input call of the C++ entry point segfaulted (tests/ops/test_ops.py::
test_bad_inputs_name_the_offender[cpu]); not reproduced on the project's CPU machine. Every
probe must end with rc=0 and the expected exception type. Exit status: the number of probes
that did not.
"""
import subprocess
import sys

PRE = (
    "import unittest.mock, torch, pathgeom_fast as pg; from pathgeom_fast import _ext; "
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
    "direct_mock": (f"{D}([g[0], unittest.mock.MagicMock(spec=torch.Tensor), g[2]], x, r, 1, False, 0.0, 0)", "TypeError"),
    "api_cpu_mock": ("pg.secant_stats([unittest.mock.MagicMock(spec=torch.Tensor)], [torch.randn(4)], [torch.randn(4)], backend='cpu')", "TypeError"),
    "direct_k_without_params": (f"{D}([None], [], [], 2, False, 0.0, 1)", "ValueError"),
    "triton_inputs_k_without_params": ("_ext._C.triton_inputs([None], [], [], 2, False)", "ValueError"),
    "direct_meta_late": (f"{D}(g, x, [r[0], r[1], torch.empty(8, device='meta')], 1, False, 0.0, 0)", "ValueError"),
    "direct_ok": (f"print({D}(g, x, r, 1, False, 0.0, 0).tolist())", None),
}


def in_process() -> int:
    """Every probe in this process (no isolation: a crash ends it, at the crashing frame)."""
    env: dict = {}
    exec(PRE, env)
    bad = 0
    for name, (code, expected) in PROBES.items():
        print(f"-- {name}: {code}", flush=True)
        try:
            exec(code, env)
            got = None
        except Exception as e:  # noqa: BLE001 - compared with the expected type
            got = type(e).__name__
            print(f"   raised {got}: {str(e)[:160]}", flush=True)
        ok = got == expected
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}", flush=True)
    print(f"{len(PROBES) - bad} of {len(PROBES)} error paths as expected (in one process)")
    return bad


def main() -> int:
    if sys.argv[1:] == ["--in-process"]:
        return in_process()
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
