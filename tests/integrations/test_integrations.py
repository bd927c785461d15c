"""The plain-loop hook (StepMeasurer) and what every integration shares: scalars against an
independent fp64 recomputation, the two-run protocol, reference checks before any step.

The framework callbacks are tested with the real libraries in test_integrations_hf.py,
test_integrations_lightning.py and test_integrations_accelerate.py (Accelerate, DDP)."""

import importlib
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import Warnings, assert_close, assert_metrics, flat, geo, grad_of, perturbed_reference, probe_summary

from pathgeom_fast.checkpoints import CheckpointError, load_snapshot
from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.integrations.common import trajectory_path
from pathgeom_fast.snapshots import list_snapshots


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def data(n=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen) * 2, torch.randint(0, 3, (n,), generator=gen)


def test_empty_full_batch_is_refused():
    from pathgeom_fast.checkpoints import Reference
    from pathgeom_fast.integrations.common import StepMeasurer

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="full_batch is empty"):
        StepMeasurer(Reference.from_model(model), full_batch=[], probe_every=5)


def test_plain_loop_minibatch_update_probes_full_wd_per_tensor_match_fp64(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    path = tmp_path / "xstar.safetensors"
    xstar = perturbed_reference(model, path)
    X, Y = data()
    probes = [(X[i : i + 8], Y[i : i + 8]) for i in (0, 8, 16)]
    full = [(X[:24], Y[:24]), (X[24:], Y[24:])]
    wd = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    geo_m = StepMeasurer(
        str(path), every=2, model=model, probe_batches=probes, probe_every=4, full_batch=full, weight_decay=wd, per_tensor=True
    )
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    checked = 0
    for step in range(7):
        i = (step * 8) % 40
        loss = F.cross_entropy(model(X[i : i + 8]), Y[i : i + 8])
        loss.backward()
        x, g = flat(model.parameters()), flat(p.grad for p in model.parameters())
        if step % 4 == 0:
            probe_g = [grad_of(model, F.cross_entropy(model(px), py)) for px, py in probes]
            full_g = grad_of(model, F.cross_entropy(model(X), Y))  # two halves of equal size: the mean
        with geo_m.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
        if step % 2:
            assert not geo_m.measured and geo_m.measured_step == step - 1
            continue
        assert geo_m.measured
        s = geo_m.scalars()
        x_next = flat(model.parameters())
        want = {"pathgeom/": geo(g, x, xstar), "pathgeom/minibatch_wd_": geo(g + wd * x, x, xstar),
                "pathgeom/update_": geo(x - x_next, x, xstar)}
        pos = 0
        for n, size in zip(names, sizes):
            sl = slice(pos, pos + size)
            pos += size
            want[f"pathgeom/tensor/{n}/"] = geo(g[sl], x[sl], xstar[sl])
        if step % 4 == 0:
            want["pathgeom/probe_"] = probe_summary(probe_g, x, xstar)
            want["pathgeom/probe_wd_"] = probe_summary([p + wd * x for p in probe_g], x, xstar)
            want["pathgeom/full_"] = geo(full_g, x, xstar)
            want["pathgeom/full_wd_"] = geo(full_g + wd * x, x, xstar)
        else:
            assert not any(k.startswith(("pathgeom/probe", "pathgeom/full")) for k in s), sorted(s)
        keys = {pre + k for pre, w in want.items() for k in w if not k.startswith("_")}
        assert set(s) == keys, sorted(set(s) ^ keys)
        for pre, w in want.items():
            assert_metrics(s, pre, w, f"step {step}", rel=1e-4 if pre == "pathgeom/update_" else 1e-5)
        checked += 1
    assert checked == 4
    # the same numbers as rows (records) of the tracker
    rows = [r for r in geo_m.records if r["kind"] == "minibatch"]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]


def test_measured_before_clipping_with_plain_sgd(tmp_path):
    """The gradient before clipping, the update after it: plain SGD's update is not lr * g then."""
    torch.manual_seed(0)
    model = mlp()
    path = tmp_path / "xstar.safetensors"
    xstar = perturbed_reference(model, path)
    X, Y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    geo_m = StepMeasurer(str(path), every=1, grad_clipping=True, final_rtol=None)
    for step in range(3):
        F.cross_entropy(model(X[:16]), Y[:16]).backward()
        x, g = flat(model.parameters()), flat(p.grad for p in model.parameters())
        geo_m.before_step(model, opt, step)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert float(norm) > 0.05  # clipping is active
        opt.step()
        geo_m.after_step()
        opt.zero_grad()
        s = geo_m.scalars()
        assert_metrics(s, "pathgeom/", geo(g, x, xstar), f"step {step}")
        assert_metrics(s, "pathgeom/update_", geo(x - flat(model.parameters()), x, xstar), f"step {step}", rel=1e-4)
    assert geo_m.tracker.update_mode == "sgd"  # the identity follows the clipped gradient: no copy


def _train(geo_m, lr=0.1, steps=12):
    """One seeded run (SGD with momentum, fixed data order) measured/recorded by geo_m."""
    torch.manual_seed(0)
    model = mlp()
    X, Y = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, x0 = [], flat(model.parameters())
    for step in range(steps):
        i = (step * 8) % 40
        loss = F.cross_entropy(model(X[i : i + 8]), Y[i : i + 8])
        loss.backward()
        losses.append(float(loss.detach()))
        with geo_m.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
    return model, losses, x0, geo_m.finish()


def test_plain_loop_two_run_protocol(tmp_path):
    ref = str(tmp_path / "run1" / "xstar.safetensors")
    os.makedirs(os.path.dirname(ref))
    snaps = str(tmp_path / "snaps")
    with Warnings() as w:
        model1, losses1, _, none = _train(StepMeasurer.recorder(ref, snapshot_dir=snaps, snapshot_every=5))
    assert none is None and not w.matching("pathgeom") and not w.matching("StepMeasurer")
    # x* is x_T, by name; the trajectory holds the loss of every step as computed by the loop
    state, meta = load_snapshot(ref)
    for n, p in model1.named_parameters():
        assert torch.equal(state[n], p.detach()), n
    assert meta["step"] == "12"
    traj = json.load(open(trajectory_path(ref)))
    assert traj["steps"] == 12 and [traj["losses"][str(s)] for s in range(12)] == losses1
    # snapshot_dir includes the final point
    assert [s for s, _ in list_snapshots(snaps)] == [0, 5, 10, 12]
    assert torch.equal(load_snapshot(os.path.join(snaps, "step_00000012.safetensors"))[0]["2.weight"], state["2.weight"])

    # run 2, identical: no warning, ends exactly at x*
    with Warnings() as w:
        _, losses2, _, ratio = _train(StepMeasurer(ref, every=3))
    assert losses2 == losses1
    assert ratio == 0.0 and not w.list, [str(x.message) for x in w.list]

    # run 2 with another learning rate: flagged at the first drifting step, and at the end
    geo_m = StepMeasurer(ref, every=3)
    with Warnings() as w:
        model2, _, x0, ratio = _train(geo_m, lr=0.2)
    assert len(w.matching("drifts from run 1 at optimizer step 1:")) == 1, [str(x.message) for x in w.list]
    assert w.matching("not ~0")
    xs = flat(state[n] for n, _ in model2.named_parameters())
    want = math.sqrt(float((flat(model2.parameters()) - xs).pow(2).sum() / (x0 - xs).pow(2).sum()))
    assert_close(ratio, want, "final distance ratio")
    assert ratio > 0.05


def test_drift_is_checked_when_scalars_are_read(tmp_path):
    ref = str(tmp_path / "xstar.safetensors")
    _train(StepMeasurer.recorder(ref), steps=6)
    traj = json.load(open(trajectory_path(ref)))
    traj["losses"]["2"] += 1e-3  # run 1 "saw" another loss at step 2
    json.dump(traj, open(trajectory_path(ref), "w"))
    torch.manual_seed(0)
    model, (X, Y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    geo_m = StepMeasurer(ref, every=4)
    with Warnings() as w:
        for step in range(6):
            loss = F.cross_entropy(model(X[step * 8 : step * 8 + 8]), Y[step * 8 : step * 8 + 8])
            loss.backward()
            with geo_m.step(model, opt, step, loss):
                opt.step()
            opt.zero_grad()
            if step == 3:
                assert not w.matching("drifts")  # losses are read only with the scalars
            if step == 4:
                geo_m.scalars()
                assert len(w.matching("drifts from run 1 at optimizer step 2:")) == 1


def _save(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"lacks 1 of the model's 4 trainable parameters, first '2\.bias'"),
        ("extra", r"key\(s\) that are not parameters or buffers of the model, first 'head\.weight'"),
        ("shape", r"'0\.weight' has shape \[16, 5\] but the model's parameter has \[16, 6\]"),
        ("int64", r"'0\.bias' has dtype torch\.int64"),
        ("ckpt", r"cannot be read without running code stored in it \(it needs argparse\.Namespace\)"),
    ],
)
def test_bad_reference_fails_before_any_step(tmp_path, case, match):
    model = mlp()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path / f"{case}.safetensors"
    if case == "missing":
        del state["2.bias"]
    elif case == "extra":
        state["head.weight"] = torch.randn(3, 3)
    elif case == "shape":
        state["0.weight"] = torch.randn(16, 5)
    elif case == "int64":
        state["0.bias"] = torch.arange(16)
    if case == "ckpt":  # a torch.save file that weights_only=True cannot read: refused, never unpickled
        import argparse

        path = tmp_path / "last.ckpt"
        torch.save({"state_dict": state, "epoch": 1, "args": argparse.Namespace(lr=0.1)}, path)
    else:
        _save(path, state)
    exc_type = KeyError if case == "missing" else CheckpointError
    with pytest.raises(exc_type, match=match) as info:
        StepMeasurer(str(path), model=model)  # with the model: every check at construction
    assert str(path) in str(info.value)
    if case == "ckpt":
        return  # refused without a model too (the format), checked above
    # without model=: the key checks run at the first step, before anything is measured
    geo_m = StepMeasurer(str(path))
    model(torch.randn(2, 6)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = flat(model.parameters())
    with pytest.raises(exc_type, match=match):
        with geo_m.step(model, opt, 0):
            opt.step()
    assert torch.equal(flat(model.parameters()), before) and geo_m.tracker is None


def test_lower_precision_reference_warns_naming_the_file(tmp_path):
    model = mlp()
    path = tmp_path / "bf16.safetensors"
    _save(path, {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()})
    with pytest.warns(UserWarning, match=rf"{path}.*lower precision.*'0\.weight'"):
        StepMeasurer(str(path), model=model)


def test_lower_precision_reference_warns_once_over_a_run(tmp_path):
    model = mlp()
    path = tmp_path / "bf16.safetensors"
    _save(path, {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()})
    X, Y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning) as rec:
        geo_m = StepMeasurer(str(path), final_rtol=None)
        for step in range(2):
            F.cross_entropy(model(X[:8]), Y[:8]).backward()
            with geo_m.step(model, opt, step):
                opt.step()
            opt.zero_grad()
        geo_m.finish()
    assert sum("lower precision" in str(w.message) for w in rec) == 1


def test_record_to_and_reference_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="give reference= .* or record_to="):
        StepMeasurer()
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        StepMeasurer(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="record_to must name a .safetensors file"):
        StepMeasurer.recorder(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="probe_every"):
        StepMeasurer.recorder(str(tmp_path / "x.safetensors"), probe_batches=[(torch.randn(2, 6), torch.zeros(2))])


def test_step_without_any_gradient_is_an_error_naming_the_step(tmp_path):
    model = mlp()
    path = tmp_path / "x.safetensors"
    perturbed_reference(model, path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    geo_m = StepMeasurer(str(path), every=1)
    for step in range(2):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        if step == 1:
            opt.zero_grad()  # the classic mistake: measured after zero_grad()
            with pytest.raises(RuntimeError, match=r"StepMeasurer: optimizer step 1: .*no gradient at all"):
                with geo_m.step(model, opt, step):
                    opt.step()
            return
        with geo_m.step(model, opt, step):
            opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("module, extra, package", [("hf", "hf", "transformers"), ("lightning", "lightning", "lightning")])
def test_missing_framework_names_the_extra(monkeypatch, module, extra, package):
    for name in list(sys.modules):
        if name == package or name.startswith(package + ".") or name == "pytorch_lightning" or name.endswith(f"integrations.{module}"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    if package == "lightning":
        monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=rf"pip install --no-build-isolation '\.\[{extra}\]'"):
        importlib.import_module(f"pathgeom_fast.integrations.{module}")
