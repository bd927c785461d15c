"""DeepSpeed ``engine.save_checkpoint`` folders as x* and as the checkpoints of a run.

Real DeepSpeed ZeRO runs on DeepSpeed's CPU accelerator (gloo) in their own processes
(tests/deepspeed_workers.py, ``save_worker``): world size 1 for stages 1, 2 and 3 (and ZeRO-2
with bf16 weights), world size 2 for stages 2 and 3. Each saves a checkpoint after each of two
optimizer steps and captures at that moment the full fp32 master weights with DeepSpeed's own
``safe_get_full_fp32_param`` on the live engine; the reader must give them back exactly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the workers
sys.path.insert(0, HERE)

import deepspeed_workers as W  # noqa: E402

from pathgeom_fast.checkpoints import CheckpointError, Reference, open_checkpoint, open_run  # noqa: E402

CASES = {1: [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")], 2: [(1, "fp32"), (2, "fp32"), (3, "fp32")]}
PARAMS = [(w, s, p) for w, cases in CASES.items() for s, p in cases]
LAUNCH = (
    "import sys; sys.path.insert(0, {here!r}); import deepspeed_workers as W; from dist_workers import launch; "
    "launch(W.save_worker, {world}, {out!r}, {cases!r})"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_ckpt")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    results = {}
    for world, cases in CASES.items():
        code = LAUNCH.format(here=HERE, world=world, out=str(out), cases=cases)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        for case, cap in torch.load(out / f"saved_world{world}.pt", weights_only=False).items():
            results[(world, *case)] = cap
    return results


def _assert_equal(ref: Reference, want: dict[str, torch.Tensor], what: str) -> None:
    assert ref.names == list(want), what
    for n, t in zip(ref.names, ref.tensors):
        assert t.dtype == torch.float32, f"{what}: {n} is {t.dtype}"
        assert torch.equal(t, want[n].float()), f"{what}: {n} differs by {float((t - want[n]).abs().max())}"


@pytest.mark.parametrize("world,stage,precision", PARAMS)
def test_reference_is_the_fp32_master_weights(saved, world, stage, precision):
    cap = saved[(world, stage, precision)]
    model = W.make_model()
    steps = sorted(cap["fp32"])
    assert steps == [1, 2]
    assert not torch.equal(cap["fp32"][1]["0.weight"], cap["fp32"][2]["0.weight"])  # the steps differ
    for step in steps:
        ref = Reference.from_file(model, os.path.join(cap["dir"], f"global_step{step}"))
        _assert_equal(ref, cap["fp32"][step], f"world {world} ZeRO-{stage} {precision} step {step}")
    # the folder itself: the tag its `latest` names (the last save)
    _assert_equal(Reference.from_file(model, cap["dir"]), cap["fp32"][2], "latest")
    # one of the tag's files: its folder
    tag = os.path.join(cap["dir"], "global_step1")
    ck = open_checkpoint(os.path.join(tag, sorted(os.listdir(tag))[0]))
    assert (ck.format, ck.path, ck.step) == ("deepspeed", tag, 1)
    if precision == "bf16":  # x* is the fp32 master, not the bf16 weights the module holds
        module = cap["module"][2]["0.weight"]
        assert module.dtype == torch.bfloat16
        assert not torch.equal(module.float(), cap["fp32"][2]["0.weight"])
        assert torch.equal(module, cap["fp32"][2]["0.weight"].bfloat16())


@pytest.mark.parametrize("world,stage", [(1, 1), (2, 3)])
def test_run_and_analyze(saved, world, stage):
    from pathgeom_fast.analyze import analyze

    cap = saved[(world, stage, "fp32")]
    run = open_run(cap["dir"])
    assert [(c.step, c.format, c.path) for c in run.checkpoints] == [
        (s, "deepspeed", os.path.join(cap["dir"], f"global_step{s}")) for s in (1, 2)
    ]
    assert [c.lr for c in run.checkpoints] == [cap["lr"][1], cap["lr"][2]] == [W.LR, W.LR]
    assert not run.notes
    X, Y = W.data()
    model = W.make_model()
    init = Reference.from_model(W.make_model(), name="init")  # x_0, before the first saved step
    res = analyze(cap["dir"], model, [(X[:8], Y[:8])], [(X[:32], Y[:32])], references=[init], progress=False)
    rows = [r for r in res.records if r["reference"] == "init"]
    assert rows and len(rows) == len(res.records)
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "probe"), (1, "full"), (2, "probe"), (2, "full")]
    assert [r["lr"] for r in rows] == [W.LR] * 4
    # x_t was read as the fp32 master weights: the loss at x_t recomputed from the captures
    for r in rows:
        m = W.make_model()
        m.load_state_dict(cap["fp32"][r["step"]])
        xb, yb = (X[:8], Y[:8]) if r["kind"] == "probe" else (X[:32], Y[:32])
        with torch.no_grad():
            want = float(torch.nn.functional.cross_entropy(m(xb), yb))
        assert abs(r["loss"] - want) <= 1e-6 * abs(want), (r, want)


def test_errors_name_the_path(saved, tmp_path, monkeypatch):
    model = W.make_model()
    src = saved[(2, 3, "fp32")]["dir"]
    # a step that was not saved
    missing = os.path.join(src, "global_step7")
    with pytest.raises(FileNotFoundError, match="global_step7"):
        Reference.from_file(model, missing)
    # `latest` names a step that is not there
    d = tmp_path / "stale"
    shutil.copytree(src, d)
    (d / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"global_step9.*is not a DeepSpeed checkpoint folder"):
        Reference.from_file(model, str(d))
    # not a DeepSpeed folder at all
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=re.escape(str(other))):
        Reference.from_file(model, str(other))
    # one rank's partition of the master weights is gone
    tag = d / "global_step2"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tag))}.* 1 \*_optim_states.pt file.* 2 ranks"):
        Reference.from_file(model, str(tag))
    # no optimizer states at all
    for f in tag.glob("*_optim_states.pt"):
        f.unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tag))} has DeepSpeed model states but no \*_optim_states.pt"):
        Reference.from_file(model, str(tag))
    # without deepspeed: a clear error naming the folder and the extra
    tag1 = os.path.join(src, "global_step1")
    for mod in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # every import of deepspeed now fails
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(CheckpointError, match=rf"{re.escape(tag1)} is a DeepSpeed checkpoint.*pip install --no-build-isolation '\.\[deepspeed\]'"):
        Reference.from_file(model, tag1)


def test_pickled_code_is_refused(saved, tmp_path):
    """The files are read weights_only with DeepSpeed's plain types allowed: anything else in
    them (here a callable that would run on load) is refused, never executed."""
    d = tmp_path / "tampered"
    shutil.copytree(saved[(1, 1, "fp32")]["dir"], d)
    tag = d / "global_step2"
    optim = next(tag.glob("*_optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["hook"] = os.system  # a global outside the allow-list
    torch.save(state, optim)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(optim))} cannot be read without running code stored in it"):
        Reference.from_file(W.make_model(), str(tag))
