"""The Lightning callback under the real ModelParallelStrategy (FSDP2 fully_shard / tensor
parallel in configure_model), 2 gloo processes on CPU: tests/lightning_fsdp2_workers.py.

Logged values are compared with an fp64 recomputation from the full x_t and pre-clip g_t that
the module's own on_before_optimizer_step gathers (full_tensor()), and with the same run in a
single process without the strategy."""

import json

import pytest
import torch

pytest.importorskip("lightning.pytorch", reason="install the lightning extra: pip install --no-build-isolation '.[lightning]'")
import torch.distributed as dist  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)
try:
    from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
except ImportError as exc:  # Lightning older than 2.4
    pytest.skip(f"this Lightning has no ModelParallelStrategy ({exc})", allow_module_level=True)

import dist_workers as W  # noqa: E402
import lightning_fsdp2_workers as LW  # noqa: E402
from integ_helpers import Warnings, assert_metrics, capture_logger, geo, probe_summary  # noqa: E402

from pathgeom_fast.integrations.common import trajectory_path  # noqa: E402
from pathgeom_fast.integrations.lightning import PathGeometryCallback  # noqa: E402

pytestmark = pytest.mark.distributed
KEYS = ("rsi", "eb", "cos", "eta_star")
PROBE_KEYS = KEYS + ("rsi_min", "cos_min", "eb_max")


def probe_grads(x: torch.Tensor) -> list[torch.Tensor]:
    """The probe batches' gradients at the flat point x, in a plain fp32 module (fp64 flat)."""
    module = LW.make_module(None)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(x.float(), module.parameters())
    out = []
    for xb, yb in LW.PROBES:
        loss = torch.nn.functional.cross_entropy(module(xb), yb)
        out.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, list(module.parameters()))]))
    return out


@pytest.mark.parametrize(
    "mode, batch_size",
    # FSDP2: each of the 2 data-parallel ranks takes 8 samples of Lightning's shuffled order, so
    # the single-process run takes batches of 16 in that order; tensor parallel: both ranks take
    # the same batches of 8
    [("fsdp2", 16), ("tp", 8)],
)
def test_model_parallel_strategy_logs_pre_clip_geometry(tmp_path, mode, batch_size):
    W.launch(LW.two_runs, 2, str(tmp_path), mode)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["global_zero"] and not r1["global_zero"]
    assert r0["warnings"] == r1["warnings"] == []  # no drift, x_T = x*
    assert r0["ratio"] == r1["ratio"] == 0.0
    xstar = r0["end1"]

    # the loggers are written on rank 0 alone, each measured step under its own step
    assert not [m for _, m in r1["rows"] if any(k.startswith("pathgeom/") for k in m)]
    rows = [(s, m) for s, m in r0["rows"] if "pathgeom/rsi" in m]
    assert [s for s, _ in rows] == list(range(LW.STEPS))
    assert [(s, m["pathgeom/final_distance_ratio"]) for s, m in r0["rows"] if "pathgeom/final_distance_ratio" in m] == [(LW.STEPS, 0.0)]
    # every rank holds the same statistics (one all-reduce of the local sums)
    assert [(r["step"], r["a"], r["b"], r["c"]) for r in r0["records"]] == [(r["step"], r["a"], r["b"], r["c"]) for r in r1["records"]]

    captured = r0["captured"]
    assert len(captured) == LW.STEPS and all(torch.equal(a[1], b[1]) for a, b in zip(captured, r1["captured"]))
    for t, ((step, m), (x, g)) in enumerate(zip(rows, captured)):
        what = f"{mode} step {t}"
        assert g.norm() > 2 * LW.CLIP and r0["clipped_norms"][t] == pytest.approx(LW.CLIP, rel=1e-5), what  # clipping bit
        assert_metrics(m, "pathgeom/", geo(g, x, xstar), what)  # the gradient before clipping
        x_next = captured[t + 1][0] if t + 1 < LW.STEPS else r0["final"]
        assert_metrics(m, "pathgeom/update_", geo(x - x_next, x, xstar), what, rel=1e-4)  # the clipped step, momentum
        if t % 2 == 0:
            assert_metrics(m, "pathgeom/probe_", probe_summary(probe_grads(x), x, xstar), what)
        else:
            assert "pathgeom/probe_rsi" not in m
        # x* again from the distributed checkpoint folder Lightning's ModelCheckpoint wrote (same point)
        for k in KEYS:
            assert m[f"pathgeom/{k}@ckpt"] == pytest.approx(m[f"pathgeom/{k}"], rel=1e-12), (what, k)

    traj = json.load(open(trajectory_path(str(tmp_path / "xstar.safetensors"))))
    assert traj["steps"] == LW.STEPS and len(traj["losses_by_rank"]) == 2

    # the same run in one process without the strategy, against the same x*
    logger = capture_logger()
    cb = PathGeometryCallback(str(tmp_path / "xstar.safetensors"), every=1, probe_batches=LW.PROBES, probe_every=2, final_rtol=None)
    with Warnings() as w:
        single, _ = LW.fit(None, [cb], batch_size, logger=logger)
    assert not w.matching("PathGeometryCallback"), w.matching("")  # its losses match the sharded run 1's
    assert cb.final_distance_ratio < 1e-4
    one = [(s, m) for s, m in logger.rows if "pathgeom/rsi" in m]
    assert [s for s, _ in one] == list(range(LW.STEPS))
    for t, ((_, m), (_, m1)) in enumerate(zip(rows, one)):
        assert (captured[t][0] - single.captured[t][0]).abs().max() <= 1e-5
        for prefix, keys in (("pathgeom/", KEYS), ("pathgeom/update_", KEYS)) + ((("pathgeom/probe_", PROBE_KEYS),) if t % 2 == 0 else ()):
            want = {k: m1[prefix + k] for k in keys}
            assert_metrics(m, prefix, want, f"{mode} step {t} vs single process", rel=1e-4)


def test_model_parallel_strategy_mixed_parameters_refused_before_training(tmp_path):
    """Tensor parallel on the first layer only: DTensors next to plain parameters, refused in
    on_fit_start with a clear message, before any step."""
    W.launch(LW.mixed_refused, 2, str(tmp_path))
