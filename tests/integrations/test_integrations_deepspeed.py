"""DeepSpeed ZeRO 1, 2 and 3 on DeepSpeed's CPU accelerator (gloo), world sizes 1 and 2.

The runs happen in tests/deepspeed_workers.py (one process, then one pair of processes, each
running every stage), which saves what the measurer logged beside independent captures made
with DeepSpeed's own full-tensor APIs. Here they are compared with fp64 recomputations
(torch.cat of flattened double copies) and with the same training run in plain torch (same
model, AdamW, accumulation, clipping), computed in this process without DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the workers
sys.path.insert(0, HERE)

import deepspeed_workers as W  # noqa: E402

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
SIZES = [128, 16, 48, 3]
KEYS = ("rsi", "eb", "cos", "eta_star")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    results = {}
    for world in (1, 2):
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "deepspeed_workers.py"), str(out), str(world)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[world] = torch.load(out / f"world{world}.pt", weights_only=False)
    return results


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def xstar_of(path):
    from safetensors.torch import load_file

    sd = load_file(path)
    return flat([sd[n] for n in NAMES])


def metrics(g, x, r):
    d = x - r
    a, b, c = float(g @ d), float(g @ g), float(d @ d)
    return {"rsi": a / c, "eb": math.sqrt(b / c), "cos": a / math.sqrt(b * c), "eta_star": a / b}


def expected(g, x, x_next, r):
    """What the measurer logs at one step, from full fp64 vectors."""
    out = {f"pathgeom/{k}": v for k, v in metrics(g, x, r).items()}
    out.update({f"pathgeom/minibatch_wd_{k}": v for k, v in metrics(g + W.WD * x, x, r).items()})
    out.update({f"pathgeom/update_{k}": v for k, v in metrics(x - x_next, x, r).items()})
    pos = 0
    for name, n in zip(NAMES, SIZES):  # per_tensor=True: pathgeom/tensor/<name>/<metric>
        sl = slice(pos, pos + n)
        pos += n
        out.update({f"pathgeom/tensor/{name}/{k}": v for k, v in metrics(g[sl], x[sl], r[sl]).items()})
    return out


def assert_close(got, want, rel, what):
    assert set(got) == set(want), f"{what}: keys {sorted(got)} vs {sorted(want)}"
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=rel, abs_tol=rel), f"{what} {k}: {got[k]!r} vs {v!r}"


def plain_torch_run():
    """The same training without DeepSpeed: x_t, the pre-clip accumulated gradient and x_t+1."""
    X, Y = W.data()
    model = W.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, weight_decay=W.WD)
    out = []
    for s in range(W.STEPS):
        for m in range(W.ACCUM):
            lo = (s * W.ACCUM + m) * W.MICRO
            (torch.nn.functional.cross_entropy(model(X[lo : lo + W.MICRO]), Y[lo : lo + W.MICRO]) / W.ACCUM).backward()
        ps = list(model.parameters())
        x, g = flat(ps), flat(p.grad for p in ps)
        torch.nn.utils.clip_grad_norm_(ps, W.CLIP)
        opt.step()
        opt.zero_grad()
        out.append((g, x, flat(ps)))
    return out


@pytest.fixture(scope="module")
def plain():
    return plain_torch_run()


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_logs_the_pre_clip_gradient_against_fp64(runs, stage, world):
    res = runs[world][stage]
    r = xstar_of(res["xstar"])
    assert len(res["scalars"]) == W.STEPS
    for t, got in enumerate(res["scalars"]):
        assert_close(got, expected(res["g"][t], res["x"][t], res["x_next"][t], r), 1e-6, f"stage {stage} world {world} step {t}")
        # ||g|| is DeepSpeed's own (pre-clip) global norm, and clipping bites at this step
        assert math.isclose(got["pathgeom/eb"] * math.sqrt(float((res["x"][t] - r) @ (res["x"][t] - r))), res["norm"][t], rel_tol=1e-6)
    assert max(res["norm"]) > W.CLIP
    # per-tensor rows: the same sums, parameter by parameter, under the module's names
    rows = [row for row in res["per_tensor"] if row["kind"] == "minibatch"]
    assert [row["tensor"] for row in rows[:4]] == NAMES
    for row in rows:
        i = NAMES.index(row["tensor"])
        sl = slice(sum(SIZES[:i]), sum(SIZES[: i + 1]))
        want = metrics(res["g"][row["step"]][sl], res["x"][row["step"]][sl], r[sl])
        for k in KEYS:
            assert math.isclose(row[k], want[k], rel_tol=1e-6, abs_tol=1e-9), (row, want)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_bf16_logs_the_pre_clip_gradient_against_fp64(runs, stage, world):
    res = runs[world][stage]["bf16"]
    r = xstar_of(runs[world][stage]["xstar"])
    assert len(res["scalars"]) == W.STEPS
    for t, got in enumerate(res["scalars"]):
        want = {k: v for k, v in expected(res["g"][t], res["x"][t], res["x_next"][t], r).items() if "wd" not in k and "tensor/" not in k}
        assert_close(got, want, 1e-5, f"bf16 stage {stage} world {world} step {t}")
        d = res["x"][t] - r
        assert math.isclose(got["pathgeom/eb"] * math.sqrt(float(d @ d)), res["norm"][t], rel_tol=1e-5)
    # x_t is the fp32 master, not its bf16 copy: after the first step it is not bf16-representable
    assert not any(torch.equal(x, x.float().bfloat16().double()) for x in res["x"][1:])


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_fp16_unscales_the_gradient(runs, stage, world):
    res = runs[world][stage]["fp16"]
    r = xstar_of(runs[world][stage]["xstar"])
    assert res["skipped"] == 0 and len(res["scalars"]) == W.STEPS
    assert all(S >= 2.0**8 for S in res["scale"]), res["scale"]  # the partitions hold the scaled gradient
    for t, got in enumerate(res["scalars"]):
        g = res["g"][t] / res["scale"][t]
        want = {k: v for k, v in expected(g, res["x"][t], res["x_next"][t], r).items() if "tensor/" not in k}
        assert_close(got, want, 1e-5, f"fp16 stage {stage} world {world} step {t}")
        d = res["x"][t] - r
        assert math.isclose(got["pathgeom/eb"] * math.sqrt(float(d @ d)), res["norm"][t], rel_tol=1e-5)  # unscaled, pre-clip


@pytest.mark.parametrize("world", [1, 2])
def test_zero_fp16_overflowing_steps_are_logged_as_skipped(runs, world):
    res = runs[world][2]["fp16_overflow"]
    assert res["skipped"] == W.STEPS  # DeepSpeed skipped every step
    assert all(torch.equal(x, xn) for x, xn in zip(res["x"], res["x_next"]))
    rows = {(r["step"], r["kind"]): r for r in res["records"]}
    for t in range(W.STEPS):
        g, u = rows[(t, "minibatch")], rows[(t, "update")]
        assert not math.isfinite(g["b"]), g  # the overflowed gradient, not a number that looks right
        assert u["a"] == 0.0 and u["b"] == 0.0 and u["c"] > 0, u  # no step was taken


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_cpu_offload_against_fp64_and_plain_torch(runs, plain, stage, world):
    res = runs[world][stage]["offload"]
    r = xstar_of(runs[world][stage]["xstar"])
    assert len(res["scalars"]) == W.STEPS
    for t, got in enumerate(res["scalars"]):
        want = {k: v for k, v in expected(res["g"][t], res["x"][t], res["x_next"][t], r).items() if "wd" not in k and "tensor/" not in k}
        assert_close(got, want, 1e-6, f"offload stage {stage} world {world} step {t}")
        want = {k: v for k, v in expected(*plain[t], r).items() if "wd" not in k and "tensor/" not in k}
        assert_close(got, want, 1e-4, f"offload stage {stage} world {world} vs plain torch, step {t}")


@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_world_sizes_and_plain_torch_agree(runs, plain, stage):
    for world in (1, 2):
        res = runs[world][stage]
        r = xstar_of(res["xstar"])
        for t, got in enumerate(res["scalars"]):
            assert_close(got, expected(*plain[t], r), 1e-4, f"stage {stage} world {world} vs plain torch, step {t}")
    for t in range(W.STEPS):
        assert_close(runs[2][stage]["scalars"][t], runs[1][stage]["scalars"][t], 1e-4, f"stage {stage}: world 2 vs 1, step {t}")


def test_world_two_really_is_partitioned(runs):
    for stage in W.STAGES:
        per_rank = runs[2][stage]["local_numel"]
        assert all(sum(n) < 195 for n in per_rank), (stage, per_rank)
        assert [sum(col) for col in zip(*per_rank)] == [128, 16, 48, 3], (stage, per_rank)
        assert [sum(n) for n in runs[1][stage]["local_numel"]] == [195]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_zero_two_run_protocol_and_every(runs, stage, world):
    res = runs[world][stage]
    assert res["ratio"] == pytest.approx(0.0, abs=1e-6)  # run 2 retraced run 1 to its x*
    assert res["losses"] == pytest.approx(res["run1_losses"], rel=1e-6)
    assert sorted(res["losses"]) == list(range(W.STEPS))
    # the loss of a step is the mean over its micro-batches (rank 0's shard at world 2)
    X, Y = W.data()
    model = W.make_model()
    per = W.MICRO // world
    with torch.no_grad():
        first = sum(float(torch.nn.functional.cross_entropy(model(X[m * W.MICRO : m * W.MICRO + per]), Y[m * W.MICRO : m * W.MICRO + per]))
                    for m in range(W.ACCUM)) / W.ACCUM
    assert res["losses"][0] == pytest.approx(first, rel=1e-6)
    # every=2: steps 0 and 2 measured, with the every=1 values
    ev = res["every2"]
    assert [s is not None for s in ev] == [True, False, True, False]
    for t in (0, 2):
        plain_keys = {k: v for k, v in res["scalars"][t].items() if "wd" not in k and "tensor/" not in k}
        assert_close(ev[t], plain_keys, 1e-6, f"every=2 step {t}")


@pytest.mark.parametrize("world", [1, 2])
def test_one_all_reduce_per_measurement(runs, world):
    for stage in W.STAGES:
        res = runs[world][stage]
        # every=2, no weight decay: one all-reduce at a measured boundary, none elsewhere
        back = [dict(c) for c in res["collectives2"]["after_backward"]]
        assert len(back) == W.STEPS * W.ACCUM
        ops = [sum(c.values()) for c in back]
        assert ops == [0, 1, 0, 0, 0, 1, 0, 0], (stage, back)
        assert all(set(c) <= {str(torch.ops.c10d.allreduce_)} for c in back), back
        assert [sum(c.values()) for c in res["collectives2"]["after_step"]] == [1, 0, 1, 0]
        # weight_decay= adds its own rows: one more all-reduce
        assert [sum(c.values()) for c in res["collectives"]["after_backward"]] == [0, 2] * W.STEPS


def test_zero_report_counts_the_whole_model(runs):
    # D is every trainable element of the model, not the rank's pieces
    assert runs[1][1]["summary"]["numel"] == 195
    assert runs[2][1]["summary"]["numel"] == 195


def test_unsupported_engines_are_refused_before_any_step(runs):
    ref = runs[1]["refusals"]
    assert ref["stage0"].startswith("refused:") and "StepMeasurer" in ref["stage0"], ref
    assert ref["nvme"].startswith("refused:") and "NVMe" in ref["nvme"], ref


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer, TrainingArguments(deepspeed=...)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    results = {}
    # world 2: the Trainer with DeepSpeed, then without it (DDP) in another pair of processes
    for world, modes in ((1, ["hf"]), (2, ["hf", "hf-plain"])):
        out = tmp_path_factory.mktemp(f"deepspeed-hf{world}")
        for mode in modes:
            proc = subprocess.run(
                [sys.executable, os.path.join(HERE, "deepspeed_workers.py"), str(out), str(world), mode],
                env=env, capture_output=True, text=True, timeout=300,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[world] = torch.load(out / f"hf_world{world}.pt", weights_only=False)
        if world == 2:
            results[world]["plain"] = torch.load(out / "hf_plain_world2.pt", weights_only=False)
    return results


def pathgeom_entries(log):
    return [h for h in log if any(k.startswith("pathgeom/") and k != "pathgeom/final_distance_ratio" for k in h)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", W.STAGES)
def test_hf_trainer_deepspeed_logs_the_run_without_deepspeed(hf_runs, stage, world, tmp_path):
    from safetensors.torch import load_file

    from pathgeom_fast.integrations.hf import PathGeometryCallback

    res = hf_runs[world][stage]
    sd = load_file(res["xstar"])
    r = flat([sd[n] for n in res["names"]])
    got = pathgeom_entries(res["log"])
    assert [h["step"] for h in got] == list(range(1, W.HF_STEPS + 1))
    for t, h in enumerate(got):  # against fp64 from DeepSpeed's own full tensors
        scal = {k: v for k, v in h.items() if k.startswith("pathgeom/")}
        want = {f"pathgeom/{k}": v for k, v in metrics(res["g"][t], res["x"][t], r).items()}
        want.update({f"pathgeom/update_{k}": v for k, v in metrics(res["x"][t] - res["x_next"][t], res["x"][t], r).items()})
        if t == W.HF_STEPS - 1:
            want["pathgeom/final_distance_ratio"] = 0.0
        assert_close(scal, want, 1e-6, f"HF + ZeRO-{stage} step {t}")
        d = res["x"][t] - r
        assert math.isclose(h["pathgeom/eb"] * math.sqrt(float(d @ d)), res["norm"][t], rel_tol=1e-6)  # pre-clip
    assert max(res["norm"]) > W.HF_CLIP
    # the same Trainer run without DeepSpeed (world 2: DDP), measured by the same callback against the same x*
    if world == 1:
        trainer = W.hf_trainer(str(tmp_path / "plain"), None)
        PathGeometryCallback.attach(trainer, reference=res["xstar"], every=1)
        trainer.train()
        plain_log = trainer.state.log_history
    else:
        plain_log = hf_runs[world]["plain"][stage]
    plain = pathgeom_entries(plain_log)
    assert [h["step"] for h in plain] == [h["step"] for h in got]
    for h_ds, h_plain in zip(got, plain):
        for k in ("rsi", "eb", "cos", "eta_star", "update_rsi", "update_eb", "update_cos"):
            a, b = h_ds[f"pathgeom/{k}"], h_plain[f"pathgeom/{k}"]
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), (stage, h_ds["step"], k, a, b)
    own = [(h["step"], h["loss"], h["grad_norm"]) for h in res["log"] if "loss" in h and "grad_norm" in h]
    plain_own = [(h["step"], h["loss"], h["grad_norm"]) for h in plain_log if "loss" in h and "grad_norm" in h]
    assert len(own) == len(plain_own) == 2
    for (s1, l1, n1), (s2, l2, n2) in zip(own, plain_own):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4) and n1 == pytest.approx(n2, rel=1e-4)


def test_hf_trainer_deepspeed_refuses_probes_in_attach(hf_runs):
    assert "probe_batches" in hf_runs[1]["probe_refusal"] and "DeepSpeed" in hf_runs[1]["probe_refusal"]
