"""torchtitan: PathGeometryMetricsProcessor on torchtitan's own pieces, CPU and gloo.

The runs happen in tests/torchtitan_workers.py (spawned gloo processes): torchtitan's llama3
debug model (two layers) parallelized by its ``parallelize_llama`` on its ``ParallelDims``
meshes and trained by ``Trainer.train_step`` itself, once with torchtitan's plain
``MetricsProcessor`` and once with ours; pipeline stages at the level of torchtitan's clip.
What the processor logged is compared here with fp64 recomputations from the full (gathered)
x_t, pre-clip gradient and x* that a spy under the processor captured, and the measured run
with the plain one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install 'torchtitan>=0.3')")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the workers
sys.path.insert(0, HERE)

import dist_workers  # noqa: E402
import torchtitan_workers as W  # noqa: E402

REL = 1e-5
MEASURED = [s for s in range(1, W.STEPS + 1) if s == 1 or s % W.LOG_FREQ == 0]  # torchtitan's should_log
TORCHTITAN_KEYS = ("loss_metrics/global_avg_loss", "loss_metrics/global_max_loss", "grad_norm", "n_tokens_seen")


def flat(ts):
    return torch.cat([t.reshape(-1).double() for t in ts])


def expected(g, x, r):
    d = x - r
    a, b, c = float(g @ d), float(g @ g), float(d @ d)
    return {"rsi": a / c, "eb": math.sqrt(b / c), "cos": a / math.sqrt(b * c), "eta_star": a / b}, (a, b, c)


def check_metrics(got: dict, prefix: str, want: dict, abc, what: str):
    """Each metric within REL of its natural scale (a is compared against sqrt(b c))."""
    _, b, c = abc
    scale = {"rsi": math.sqrt(b / c), "eb": math.sqrt(b / c), "cos": 1.0, "eta_star": math.sqrt(c / b)}
    for k, v in want.items():
        g = got[f"{prefix}{k}"]
        assert abs(g - v) <= REL * scale[k], f"{what} {prefix}{k}: logged {g!r}, fp64 {v!r}"


def run_layout(tmp_path, world, layout):
    out = str(tmp_path / "run.pt")
    dist_workers.launch(W.run, world, out, layout)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(
    "world,layout",
    [
        (1, {}),                     # FSDP2 on a 1-rank mesh (what torchtitan always applies)
        (2, {}),                     # FSDP2, dp_shard = 2
        (2, {"tp": 2}),              # 2-D (fsdp, tp): TP-sharded linears, TP-replicated norms
        (2, {"dp_replicate": 2}),    # HSDP 2-D (dp_replicate, fsdp): a replicated mesh dimension
    ],
    ids=["world1-fsdp", "world2-fsdp", "world2-fsdp1xtp2", "world2-hsdp2x1"],
)
def test_train_step_logs_fp64_geometry(tmp_path, world, layout):
    r = run_layout(tmp_path, world, layout)
    names, calls, logged = r["names"], r["calls"], r["logged"]
    R = flat([r["xstar"][n] for n in names])
    assert len(calls) == W.STEPS  # torchtitan's clip ran once per step, through the processor
    by_step = {s: m for s, m in logged if "grad_norm" in m}
    assert sorted(by_step) == MEASURED  # logged (and measured) at log_freq, as torchtitan logs
    xs = [flat(c["x"]) for c in calls] + [flat([r["final"][n] for n in names])]
    for s in MEASURED:
        c = calls[s - 1]
        X, G = xs[s - 1], flat(c["g"])
        assert G.abs().sum() > 0 and (X - R).abs().sum() > 0
        want, abc = expected(G, X, R)
        m = by_step[s]
        check_metrics(m, "pathgeom/", want, abc, f"step {s}")
        U = X - xs[s]  # the step the optimizer took, with the clipped gradient
        want_u, abc_u = expected(U, X, R)
        check_metrics(m, "pathgeom/update_", want_u, abc_u, f"step {s} update")
        # torchtitan's grad_norm: its own (pre-clip) norm, passed through unchanged
        assert m["grad_norm"] == c["norm"]
        assert math.isclose(c["norm"], math.sqrt(abc[1]), rel_tol=1e-4)  # torchtitan's norm: fp32 sums
    for c in calls:  # the clipping still bites
        assert c["norm"] > 2 * W.MAX_NORM
        assert math.isclose(c["norm_after_clip"], W.MAX_NORM, rel_tol=1e-4)
    # the same training and torchtitan metrics as without the processor
    plain = {s: m for s, m in r["plain_logged"]}
    assert sorted(plain) == MEASURED
    for s in MEASURED:
        ours = {k: v for k, v in by_step[s].items() if not k.startswith("pathgeom/")}
        assert set(ours) == set(plain[s])
        for k in [*TORCHTITAN_KEYS, *(k for k in plain[s] if k.startswith("lr"))]:
            assert ours[k] == plain[s][k], (s, k, ours[k], plain[s][k])
    for n in names:
        assert torch.equal(r["final"][n], r["plain_final"][n]), n
    # rows and the replay's end
    rows = {(row["step"], row["kind"]) for row in r["records"]}
    assert {(s, k) for s in MEASURED for k in ("minibatch", "update")} <= rows
    first = xs[0]
    want_ratio = float((xs[-1] - R).norm() / (first - R).norm())
    assert math.isclose(r["ratio"], want_ratio, rel_tol=REL)
    assert [m for s, m in logged if "pathgeom/final_distance_ratio" in m][0]["pathgeom/final_distance_ratio"] == r["ratio"]
    assert r["restored"]  # close() gave torchtitan its clip_grad_norm_ back


def test_pipeline_stages_summed(tmp_path):
    out = str(tmp_path / "pp.pt")
    dist_workers.launch(W.run_pp, 2, out)
    r = torch.load(out, weights_only=False)
    stages, xstar = r["stages"], r["xstar"]
    assert not set(stages[0]["names"]) & set(stages[1]["names"])  # different parameters per stage
    names = stages[0]["names"] + stages[1]["names"]
    R = flat([xstar[n] for n in names])
    for i, step in enumerate((1, 2)):
        X = torch.cat([flat(st["calls"][i]["x"]) for st in stages])
        G = torch.cat([flat(st["calls"][i]["g"]) for st in stages])
        want, abc = expected(G, X, R)
        for rank, st in enumerate(stages):
            assert st["calls"][i]["pp_mesh"]
            m = {s: m for s, m in st["logged"] if "grad_norm" in m}[step]
            check_metrics(m, "pathgeom/", want, abc, f"rank {rank} step {step}")
            # torchtitan reduced its norm over the pp mesh; the processor left it as it was
            assert m["grad_norm"] == st["calls"][i]["norm"]
            assert math.isclose(m["grad_norm"], math.sqrt(abc[1]), rel_tol=1e-4)  # torchtitan's, fp32
        # each stage clipped its part by the same global factor: the parts' norms add up to max_norm
        after = math.sqrt(sum(st["calls"][i]["norm_after_clip"] ** 2 for st in stages))
        assert math.isclose(after, W.MAX_NORM, rel_tol=1e-4)
    X0 = torch.cat([flat(st["calls"][0]["x"]) for st in stages])
    XT = torch.cat([flat([st["final"][n] for n in st["names"]]) for st in stages])
    want_ratio = float((XT - R).norm() / (X0 - R).norm())
    assert all(math.isclose(st["ratio"], want_ratio, rel_tol=REL) for st in stages)


# ------------------------------------------------------------------------------------------
# In this process: refusals and the plain case
# ------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_metrics(monkeypatch):
    import torchtitan.components.metrics as tm
    import torchtitan.tools.utils as tu

    monkeypatch.setattr(tm, "build_device_memory_monitor", W._MemoryMonitor)
    monkeypatch.setattr(tu, "get_peak_flops", lambda name: 1e12)


def _dims(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"ep": 1, "pp": 1, **kw})


def _xstar(tmp_path, model):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    path = str(tmp_path / "xstar.safetensors")
    save_file({n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}, path)
    return path


def test_refusals_before_any_step(tmp_path, cpu_metrics):
    import torchtitan.distributed.utils as du

    from pathgeom_fast.integrations.torchtitan import PathGeometryMetricsProcessor as P

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    path = _xstar(tmp_path, model)
    original = du.clip_grad_norm_
    with pytest.raises(ValueError, match=r"expert parallelism \(ep=2\) is not supported"):
        P(P.Config(pathgeom_reference=path), parallel_dims=_dims(ep=2))
    with pytest.raises(ValueError, match="pathgeom_record_to with pipeline parallelism"):
        P(P.Config(pathgeom_record_to=str(tmp_path / "x.safetensors")), parallel_dims=_dims(pp=2))
    assert du.clip_grad_norm_ is original  # nothing installed by a refused processor
    proc = P(P.Config(pathgeom_reference=path), parallel_dims=_dims())
    try:
        other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
        with pytest.raises(Exception, match="shape"):
            proc.model_parts = [other]  # what Trainer.__init__ does: checked here, before any step
    finally:
        proc.close()
    assert du.clip_grad_norm_ is original


def test_plain_without_reference(cpu_metrics):
    import torchtitan.distributed.utils as du

    from pathgeom_fast.integrations.torchtitan import PathGeometryMetricsProcessor as P

    original = du.clip_grad_norm_
    proc = P(P.Config(log_freq=3), parallel_dims=_dims())
    assert proc.measurer is None and du.clip_grad_norm_ is original
    assert [proc.should_log(s) for s in (1, 2, 3, 6)] == [True, False, True, True]
    proc.close()


def test_missing_torchtitan_message():
    code = (
        "import sys; sys.modules['torchtitan'] = None\n"
        "try:\n    import pathgeom_fast.integrations.torchtitan\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(HERE))
    assert "needs torchtitan: pip install 'torchtitan>=0.3'" in out.stdout, out.stdout + out.stderr
