"""Property-based fuzzing of the ops and of the compiled entry points.

Each generated case (lists of tensors of every float dtype, views, empty and larger tensors,
tensor subclasses, Parameters, and at most one bad entry: None, a non-tensor, a tensor-like
mock, an integer/complex/bool tensor, a meta tensor among CPU ones, a numel mismatch, K
gradients of different dtypes; or mismatched list lengths / K) runs in a worker process, so
that a crash (a signal) is a failed case instead of the end of the test run. One worker runs
the cases one after another and reports each; when it dies, the case in flight is the one
that killed it, and a fresh worker takes the next case.

Expected outcome of a case: the result equals an independent fp64 reference (torch.float64
on flattened copies) within the error model of the design (|a err| <= 1e-6 sqrt(b c), b and c
within 1e-6 relative, for fp32 arithmetic), or a ValueError/TypeError whose message names the
offending entry (a length mismatch: its message states the lengths).

    python tests/ops/test_fuzz.py --worker      (the worker: JSON cases on stdin, results on stdout)
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest

FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
BAD_DTYPES = ["int64", "int32", "uint8", "bool", "complex64"]
LAYOUTS = ["contig", "transposed", "strided", "offset", "expanded", "permuted3"]
KINDS = ["plain", "plain", "plain", "param", "subclass", "dispatch"]
BAD_KINDS = ["none", "mock", "int", "list", "dtype", "meta", "numel", "kdtype", "wrapper"]
# api -> what it runs; "pg" also picks a backend
APIS = ["pg", "pg", "pg", "direct", "dispatcher", "triton_inputs", "cuda_host_work"]
CASE_TIMEOUT_S = 120


# --------------------------------------------------------------------------------------
# The worker (runs in a subprocess; imports torch only there)
# --------------------------------------------------------------------------------------


def _worker() -> None:  # pragma: no cover - runs in a subprocess
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import unittest.mock

    import torch

    import pathgeom_fast as pg
    from pathgeom_fast import _ext, triton_kernels

    class Sub(torch.Tensor):
        """A plain Python subclass (no __torch_dispatch__)."""

    class Dispatch(torch.Tensor):
        """A subclass with __torch_dispatch__ and memory of its own: every op on it runs
        Python code (and here calls the op again, on other data)."""

        @staticmethod
        def __new__(cls, t):
            return torch.Tensor._make_subclass(cls, t)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            # a nested call on this thread, in the middle of the outer one
            a = [torch.arange(3.0)]
            pg.secant_stats(a, a, [torch.zeros(3)], backend="cpu" if _ext.available() else "torch")

            with torch._C._DisableTorchDispatch():
                return func(*args, **(kwargs or {}))

    # tests/ by name: the sanitizer run sets PYTHONSAFEPATH, which keeps the script's own folder
    # off sys.path (tests/ holds no pathgeom_fast, so the sanitized build still wins)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils import WrapperTensor as Wrapper  # a wrapper subclass: no memory of its own

    def make_base(n: int, dtype, gen) -> torch.Tensor:
        return (torch.randn(n, generator=gen, dtype=torch.float64) + 0.25).to(dtype)

    def make_entry(spec: dict, n: int, gen):
        """(object passed to the op, its plain fp64 values or None)."""
        bad = spec.get("bad")
        if bad == "none":
            return None, None
        if bad == "mock":
            return unittest.mock.MagicMock(spec=torch.Tensor), None
        if bad == "int":
            return 7, None
        if bad == "list":
            return [1.0] * max(n, 1), None
        dtype = getattr(torch, spec["dtype"])
        if bad == "dtype":
            base = torch.randint(0, 5, (n,), generator=gen).to(dtype)
            return base, None
        if bad == "meta":
            return torch.empty(n, device="meta"), None
        if bad == "wrapper":  # the compiled kernels cannot read it (n > 0)
            return Wrapper(make_base(max(n, 1), dtype, gen)), None
        if bad == "numel":
            n = n + spec.get("delta", 1)
        base = make_base(n, dtype, gen)
        values = base.double()
        layout = spec.get("layout", "contig")
        if layout == "transposed" and n % 2 == 0 and n > 0:
            t = base.reshape(n // 2, 2).t().contiguous().t()  # shape [n/2, 2], column-major
            values = t.double().reshape(-1)
        elif layout == "strided":
            big = torch.zeros(2 * n, dtype=dtype)
            big[::2] = base
            t = big[::2]
        elif layout == "offset":
            big = torch.zeros(n + 3, dtype=dtype)
            big[3:] = base
            t = big[3:]
        elif layout == "expanded" and n > 0:
            one = make_base(1, dtype, gen)
            t = one.expand(n)
            values = one.double().expand(n).clone()
        elif layout == "permuted3" and n % 6 == 0 and n > 0:
            t = base.reshape(2, 3, n // 6).permute(2, 0, 1)
            values = t.double().reshape(-1)
        else:
            t = base
        kind = spec.get("kind", "plain")
        if kind == "param":
            t = torch.nn.Parameter(t, requires_grad=spec.get("requires_grad", False))
        elif kind == "subclass":
            t = t.as_subclass(Sub)
        elif kind == "dispatch":
            t = Dispatch(t)
        return t, values

    def reference(gv, xv, rv, K, T, wd, per_tensor, gram):
        """fp64 rows [T, K, 3] (or Gram [T, K+1, K+1]) on flattened copies."""
        if gram:
            rows = torch.zeros(T, K + 1, K + 1, dtype=torch.float64)
        else:
            rows = torch.zeros(T, K, 3, dtype=torch.float64)
        for i in range(T):
            d = xv[i].reshape(-1) - rv[i].reshape(-1)
            if gram:
                V = torch.stack([gv[k * T + i].reshape(-1) for k in range(K)] + [d]) if d.numel() else None
                if V is not None:
                    rows[i] = V @ V.T
                continue
            for k in range(K):
                h = gv[k * T + i].reshape(-1) + wd * xv[i].reshape(-1)
                rows[i, k] = torch.stack([(h * d).sum(), (h * h).sum(), (d * d).sum()])
        return rows if per_tensor else rows.sum(0, keepdim=True)

    def compare(out, ref, gram) -> str | None:
        """None when out matches ref within the error model, else a description."""
        if out.dtype != torch.float64:
            return f"dtype {out.dtype}"
        if tuple(out.shape) != tuple(ref.shape):
            return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        out = out.cpu()
        tol = 2e-6  # fp32 arithmetic; fp64 inputs do better
        if not gram:
            a, b, c = ref.unbind(-1)
            ea, eb, ec = (out - ref).abs().unbind(-1)
            ok = (ea <= tol * (b * c).sqrt() + 1e-30) & (eb <= tol * b + 1e-30) & (ec <= tol * c + 1e-30)
        else:  # Gram: entries against the norms of their row and column
            diag = torch.diagonal(ref, dim1=-2, dim2=-1)
            scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()
            ok = (out - ref).abs() <= tol * scale + 1e-30
        if not bool(ok.all()):
            return f"result {out.tolist()} != reference {ref.tolist()}"
        return None

    def run_case(case: dict) -> dict:
        gen = torch.Generator().manual_seed(case["seed"])
        T, K, sizes = case["T"], case["K"], case["sizes"]
        api, mode = case["api"], case["mode"]
        gram = mode == "gram"
        objs = {"g": [], "x": [], "r": []}
        vals = {"g": [], "x": [], "r": []}
        for k in range(K):
            for i in range(T):
                o, v = make_entry(case["entries"][f"g{k}"][i], sizes[i], gen)
                objs["g"].append(o)
                vals["g"].append(v)
        for lst in ("x", "r"):
            for i in range(T):
                o, v = make_entry(case["entries"][lst][i], sizes[i], gen)
                objs[lst].append(o)
                vals[lst].append(v)
        g, x, r = objs["g"], objs["x"], objs["r"]
        # list-length mismatches
        if case.get("drop") == "refs" and r:
            r = r[:-1]
        elif case.get("drop") == "grads" and g:
            g = g[:-1]
        k_arg = K + case.get("k_offset", 0)
        wd = 0.0 if gram else case["wd"]
        per_tensor = case["per_tensor"]
        lists = [g[k * T:(k + 1) * T] for k in range(K)]
        try:
            if api == "pg":
                if gram:
                    out = pg.secant_gram(lists, x, r, per_tensor=per_tensor, backend=case["backend"])
                elif mode == "multi":
                    out = pg.secant_stats_multi(lists, x, r, per_tensor=per_tensor, weight_decay=wd,
                                                backend=case["backend"])
                else:
                    out = pg.secant_stats(g, x, r, per_tensor=per_tensor, weight_decay=wd, backend=case["backend"])
            elif api == "direct":
                m = {"single": 0, "multi": 1, "gram": 2}[mode]
                out = _ext._C.secant_stats_direct(g, x, r, k_arg, per_tensor, wd, m)
            elif api == "triton_inputs":
                _ext._C.triton_inputs(g, x, r, k_arg, gram)
                return {"status": "ok", "checked_only": True}
            elif api == "cuda_host_work":  # the CUDA backend's host work: checks, plan, device table
                _ext._C.cuda_host_work(g, x, r, k_arg, True)
                return {"status": "ok", "checked_only": True}
            else:  # the registered ops, through the dispatcher
                if gram:
                    out = torch.ops.pathgeom.secant_gram(g, x, r, k_arg, per_tensor)
                elif mode == "multi":
                    out = torch.ops.pathgeom.secant_stats_multi(g, x, r, k_arg, per_tensor, wd)
                else:
                    out = torch.ops.pathgeom.secant_stats(g, x, r, per_tensor, wd)
        except Exception as e:  # noqa: BLE001 - the parent judges the type
            return {"status": "raised", "type": type(e).__name__, "message": str(e)[:2000]}
        ref = reference(vals["g"], vals["x"], vals["r"], K, T, wd, per_tensor, gram)
        if gram:
            want = ref if per_tensor else ref[0]
        elif mode == "multi":
            want = ref.permute(1, 0, 2) if per_tensor else ref[0]
        else:
            want = ref[:, 0] if per_tensor else ref[0, 0]
        problem = compare(out.detach(), want, gram)
        return {"status": "ok"} if problem is None else {"status": "wrong", "message": problem}

    info = {
        "ext": _ext.available(),
        "triton": triton_kernels.available(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        if "signal" in case:  # the harness's own test: die as a crashing kernel would
            import signal

            os.kill(os.getpid(), getattr(signal, case["signal"]))
        print(json.dumps(run_case(case)), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
    sys.exit(0)


# --------------------------------------------------------------------------------------
# The parent: a worker process, case generation, and the expected outcomes
# --------------------------------------------------------------------------------------


class Worker:
    def __init__(self) -> None:
        self.proc = None
        self.info: dict = {}

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("TRITON_INTERPRET", "1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        first = self._read(CASE_TIMEOUT_S)
        if first is None:
            raise RuntimeError(f"fuzz worker did not start: {self._death()}")
        self.info = json.loads(first)

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line or None

    def _death(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        rc = self.proc.returncode
        self.proc = None
        return f"worker exit status {rc}; stderr tail:\n{err[-3000:]}"

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"status": "crashed", "message": self._death()}
        line = self._read(CASE_TIMEOUT_S)
        if line is None:
            return {"status": "crashed", "message": self._death()}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    w.start()
    yield w
    w.close()


def expected(case: dict, info: dict) -> tuple[str, str | None]:
    """("ok", None) or ("raise", the entry name the message must contain, or "" for a
    length message)."""
    T, K, mode, api = case["T"], case["K"], case["mode"], case["api"]
    if case.get("drop") or case.get("k_offset", 0):
        return "raise", ""
    for lst, entries in case["entries"].items():
        for i, e in enumerate(entries):
            if e.get("bad"):
                if lst == "x":
                    name = f"params[{i}]"
                elif lst == "r":
                    name = f"refs[{i}]"
                else:
                    k = int(lst[1:])
                    base = "vecs" if mode == "gram" else "grads"
                    name = f"{base}[{i}]" if K == 1 else f"{base}[{k}][{i}]"
                return "raise", name
    return "ok", None


def judge(case: dict, result: dict, info: dict) -> str | None:
    """None when the result is the expected outcome, else what went wrong."""
    what, name = expected(case, info)
    status = result["status"]
    if status == "crashed":
        return f"the worker died on this case: {result['message']}"
    if what == "ok":
        if status == "ok":
            return None
        return f"expected the reference result, got {result}"
    if status != "raised":
        return f"expected a ValueError/TypeError naming {name or 'the lengths'}, got {result}"
    if result["type"] not in ("ValueError", "TypeError"):
        return f"expected ValueError/TypeError, got {result['type']}: {result['message']}"
    msg = result["message"]
    if name and name not in msg:
        return f"the message does not name {name}: {msg}"
    if not name and not any(s in msg for s in ("matching lengths", "tensors but params", "must be >= 1", "must be between", "is empty")):
        return f"the message does not state the lengths: {msg}"
    return None


# --------------------------------------------------------------------------------------
# Case generation
# --------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 6, 12, 30]),
    st.integers(0, 300),
    st.sampled_from([4095, 4096, 4097, 32768 + 6, 70002]),
)


@st.composite
def cases(draw) -> dict:
    api = draw(st.sampled_from(APIS))
    # cuda_host_work serves the secant ops only (its messages name grads, not vecs)
    mode = draw(st.sampled_from(["single", "multi"] if api == "cuda_host_work" else ["single", "multi", "gram"]))
    T = draw(st.integers(1, 6))
    K = 1 if mode == "single" else draw(st.integers(1, 3))
    backend = "cpu"
    if api == "pg":
        backend = draw(st.sampled_from(["cpu", "cpu", "auto", "torch", "triton"]))
    small = backend == "triton"
    sizes = [draw(st.integers(0, 48) if small else SIZES) for _ in range(T)]
    if sum(sizes) * (K + 2) > 600_000:  # keep memory and time small
        sizes = [min(s, 300) for s in sizes]
    lists = [f"g{k}" for k in range(K)] + ["x", "r"]
    entries = {}
    for lst in lists:
        entries[lst] = []
        for i in range(T):
            kinds = KINDS if api != "dispatcher" else ["plain", "param"]
            e = {
                "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
                "layout": draw(st.sampled_from(LAYOUTS)),
                "kind": draw(st.sampled_from(kinds)),
            }
            entries[lst].append(e)
    # the K gradients of one position share a dtype
    for k in range(1, K):
        for i in range(T):
            entries[f"g{k}"][i]["dtype"] = entries["g0"][i]["dtype"]
    case = {
        "api": api, "mode": mode, "T": T, "K": K, "sizes": sizes, "backend": backend,
        "per_tensor": draw(st.booleans()),
        "wd": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "entries": entries,
    }
    trouble = draw(st.sampled_from(["none", "none", "entry", "entry", "lengths"]))
    if trouble == "lengths":
        choices = ["refs", "grads"] + (["k"] if api in ("direct", "dispatcher", "triton_inputs", "cuda_host_work") and mode != "single" else [])
        which = draw(st.sampled_from(choices))
        if which == "k":
            case["k_offset"] = draw(st.sampled_from([-K, 1, 2, -1 if K > 1 else 1]))
        else:
            case["drop"] = which
    elif trouble == "entry":
        bad = draw(st.sampled_from(BAD_KINDS))
        if api == "dispatcher" and bad in ("none", "mock", "int", "list", "meta"):
            bad = "dtype"  # the dispatcher's own argument parser refuses non-tensors, naming no index
        if bad == "wrapper" and not (api in ("direct", "triton_inputs", "cuda_host_work") or (api == "pg" and backend in ("cpu", "auto"))):
            bad = "dtype"  # the torch backend (and the dispatcher) compute through its __torch_dispatch__
        lst = draw(st.sampled_from(lists))
        i = draw(st.integers(0, T - 1))
        if bad == "kdtype":
            if K < 2:
                bad, lst = "dtype", lst
            else:
                lst = f"g{draw(st.integers(1, K - 1))}"
                other = [d for d in FLOAT_DTYPES if d != entries["g0"][i]["dtype"]]
                entries[lst][i]["dtype"] = draw(st.sampled_from(other))
                entries[lst][i]["bad"] = "kdtype"
        if bad == "meta" and lst == "x" and i == 0:
            i = 1 if T > 1 else i
            lst = "r" if T == 1 else lst
        if bad == "numel" and lst == "x":
            lst = "r"  # a params numel mismatch is reported on refs[i] / grads[i]
        if bad != "kdtype":
            e = entries[lst][i]
            e["bad"] = bad
            if bad == "dtype":
                e["dtype"] = draw(st.sampled_from(BAD_DTYPES))
            e["kind"] = "plain"
            e["layout"] = "contig"
    return case


FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("PATHGEOM_FUZZ_EXAMPLES", "800")),
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a failing case is reported as generated
    suppress_health_check=list(HealthCheck),
)


@FUZZ_SETTINGS
@given(case=cases())
def test_fuzz_ops_and_entry_points(worker, case):
    if case["api"] != "pg" and not worker.info["ext"]:
        pytest.skip("the compiled extension is not built")
    if case["api"] == "pg" and case["backend"] == "cpu" and not worker.info["ext"]:
        case["backend"] = "torch"
    if case["backend"] == "triton" and not worker.info["triton"]:
        case["backend"] = "torch"
    result = worker.run(case)
    problem = judge(case, result, worker.info)
    assert problem is None, f"case {json.dumps(case)}: {problem}"


def test_fuzz_worker_names_a_crashing_case():
    """The harness itself: a case that kills the worker with a signal is reported as a crash
    of that case (with the worker's exit status), and the next case runs in a fresh worker."""
    w = Worker()
    w.start()
    first = w.proc.pid
    crashed = w.run({"signal": "SIGKILL"})
    assert crashed["status"] == "crashed" and "exit status -9" in crashed["message"], crashed
    case = {"api": "pg", "mode": "single", "T": 1, "K": 1, "sizes": [5], "backend": "torch", "per_tensor": False,
            "wd": 0.0, "seed": 1, "entries": {k: [{"dtype": "float32"}] for k in ("g0", "x", "r")}}
    assert judge(case, crashed, w.info) is not None
    assert w.run(case) == {"status": "ok"} and w.proc.pid != first
    w.close()
