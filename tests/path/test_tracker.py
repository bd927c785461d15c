"""PathTracker rows against an independent fp64 recomputation (torch.cat, the paper's way)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import pathgeom_fast as pg
from pathgeom_fast.tracker import PathTracker, Reference


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def abc(g, x, r):
    d = x - r
    return torch.stack([g @ d, g @ g, d @ d])


def tiny_model(bn=False):
    layers = [torch.nn.Linear(6, 8)]
    if bn:
        layers += [torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.3)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_wd_groups": None,  # built in the test: two groups with different lr / weight decay
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, dampening=0.1),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}
EXPECTED_MODE = {"sgd": "sgd", "sgd_wd_groups": "sgd", "momentum": "momentum", "nesterov": "copy", "adam": "copy"}


def run(opt_name, steps=6, probes=True, bn=False, tracker_kwargs=None, xstar=None, seed=0):
    torch.manual_seed(seed)
    model = tiny_model(bn)
    if opt_name == "sgd_wd_groups":
        opt = torch.optim.SGD(
            [{"params": model[0].parameters(), "lr": 0.2, "weight_decay": 0.05}, {"params": model[-1].parameters()}], lr=0.1
        )
    else:
        opt = OPTIMIZERS[opt_name](model.parameters())
    X, Y = data()
    ref = xstar if xstar is not None else Reference([n for n, _ in model.named_parameters()], [torch.randn_like(p) for p in model.parameters()])
    probe_batches = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 24, 8)]
    tracker = PathTracker(
        model, ref, opt, loss_fn=loss_fn, probe_batches=probe_batches if probes else None, probe_every=2 if probes else 0,
        full_batch=[(X[:40], Y[:40]), (X[40:], Y[40:])] if probes else None, weight_decay=0.03, **(tracker_kwargs or {}),
    )
    history = []
    for step in range(steps):
        idx = slice((step * 16) % 64, (step * 16) % 64 + 16)
        loss = loss_fn(model, (X[idx], Y[idx]))
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        with tracker.step(step, loss):
            opt.step()
        after = [p.detach().clone() for p in model.parameters()]
        history.append((before, grads, after))
    return model, tracker, history, ref, (X, Y), probe_batches


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_rows_match_fp64_recomputation(opt_name):
    model, tracker, history, ref, (X, Y), probe_batches = run(opt_name)
    assert tracker.update_mode == EXPECTED_MODE[opt_name]
    r = flat(ref.tensors)
    rows = {(row["step"], row["kind"], row["sample"]): row for row in tracker.records}
    for step, (before, grads, after) in enumerate(history):
        x, g = flat(before), flat(grads)
        checks = {
            "minibatch": abc(g, x, r),
            "minibatch_wd": abc(g + 0.03 * x, x, r),
            "update": abc(x - flat(after), x, r),
        }
        for kind, want in checks.items():
            row = rows[(step, kind, 0)]
            got = torch.tensor([row["a"], row["b"], row["c"]], dtype=torch.float64)
            tol = 1e-5 * torch.sqrt(want[1] * want[2])
            assert abs(got[0] - want[0]) <= tol, (opt_name, step, kind, got, want)
            assert torch.allclose(got[1:], want[1:], rtol=1e-5), (opt_name, step, kind, got, want)
            geo = pg.geometry(want)
            assert row["rsi"] == pytest.approx(float(geo.rsi), rel=1e-4, abs=1e-6)
            assert row["eb"] == pytest.approx(float(geo.eb), rel=1e-4)
            assert row["cos"] == pytest.approx(float(geo.cos), rel=1e-4, abs=1e-6)
        if step % 2 == 0:  # probes and the full batch, at x_t
            m = copy.deepcopy(model)
            with torch.no_grad():
                for p, v in zip(m.parameters(), before):
                    p.copy_(v)
            for k, b in enumerate(probe_batches + [None]):
                if b is None:
                    loss = (loss_fn(m, (X[:40], Y[:40])) * 40 + loss_fn(m, (X[40:], Y[40:])) * 24) / 64
                    key = (step, "full", 0)
                else:
                    loss = loss_fn(m, b)
                    key = (step, "probe", k)
                gk = flat(torch.autograd.grad(loss, list(m.parameters())))
                want = abc(gk, x, r)
                row = rows[key]
                got = torch.tensor([row["a"], row["b"], row["c"]], dtype=torch.float64)
                assert abs(got[0] - want[0]) <= 1e-5 * torch.sqrt(want[1] * want[2]), (key, got, want)
                assert torch.allclose(got[1:], want[1:], rtol=1e-5), (key, got, want)


def test_probes_do_not_change_the_path():
    # with BatchNorm and Dropout, probe forward passes would change buffers and consume RNG
    a = run("momentum", probes=True, bn=True)[0]
    b = run("momentum", probes=False, bn=True)[0]
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_replay_is_deterministic():
    t1 = run("adam")[1]
    t2 = run("adam")[1]
    assert t1.records == t2.records


def test_per_tensor_rows_sum_to_total():
    tracker = run("sgd", probes=False, tracker_kwargs={"per_tensor": True})[1]
    per = [r for r in tracker.per_tensor_records if r["step"] == 3]
    total = next(r for r in tracker.records if r["step"] == 3 and r["kind"] == "minibatch")
    assert [r["tensor"] for r in per] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for key in ("a", "b", "c"):
        assert sum(r[key] for r in per) == pytest.approx(total[key], rel=1e-12)


def test_drift_and_final_distance_warnings():
    model, tracker, *_ = run("sgd", probes=False)
    with pytest.warns(RuntimeWarning, match="did not retrace"):
        tracker.finish()  # the random reference is not where the run ended
    # losses recorded in a first run, replayed with a perturbed one
    _, t1, *_ = run("sgd", probes=False, steps=3)
    losses = {r["step"]: r["loss"] for r in t1.records if r["kind"] == "minibatch"}
    losses[2] += 1e-3
    with pytest.warns(RuntimeWarning, match="drifts from the recorded path at step 2"):
        run("sgd", probes=False, steps=3, tracker_kwargs={"expected_losses": losses})[1].records  # checked when read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses[2] -= 1e-3
        run("sgd", probes=False, steps=3, tracker_kwargs={"expected_losses": losses})[1].records


def test_end_of_replay_at_reference_is_silent():
    model, tracker, *_ = run("sgd", probes=False, steps=4)
    final = Reference.from_model(model)
    _, tracker2, *_ = run("sgd", probes=False, steps=4, xstar=final)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tracker2.finish() == 0.0


def test_reference_errors():
    model = tiny_model()
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    del sd["2.bias"]
    with pytest.raises(KeyError, match=r"reference state dict lacks 1 of the model's 4 trainable parameters, first '2.bias'"):
        Reference.from_state_dict(model, sd)
    sd["2.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"'2.bias' has shape \[4\] but the model's parameter has \[3\]"):
        Reference.from_state_dict(model, sd)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="does not match the model"):
        PathTracker(other, Reference.from_model(model))
    with pytest.raises(RuntimeError, match="without measure"):
        PathTracker(model, Reference.from_model(model), torch.optim.SGD(model.parameters(), lr=0.1)).after_step()
    with pytest.raises(ValueError, match="full_batch is empty"):
        PathTracker(model, Reference.from_model(model), full_batch=iter([]))


class _NoHostConversion(torch.overrides.TorchFunctionMode):
    """Fails on every tensor -> Python number / host conversion (item, tolist, float, cpu, ...)."""

    BANNED = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        to_cpu = name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values()))
        if name in self.BANNED or to_cpu:
            raise AssertionError(f"host conversion inside a measured step: Tensor.{name}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("opt_name", ["sgd_wd_groups", "momentum", "adam"])
def test_measured_step_does_no_host_conversion(opt_name):
    """On a GPU each conversion is a host synchronisation; on CPU the same calls are caught here."""
    torch.manual_seed(0)
    model = tiny_model(bn=True)
    if opt_name == "sgd_wd_groups":
        opt = torch.optim.SGD([{"params": model[0].parameters(), "weight_decay": 0.05}, {"params": model[-1].parameters()}], lr=0.1)
    else:
        opt = OPTIMIZERS[opt_name](model.parameters())
    X, Y = data()
    refs = {"xstar": Reference.from_model(model), "x0": Reference.from_model(model, name="x0")}
    with torch.no_grad():
        for t in refs["xstar"].tensors:
            t.add_(torch.randn_like(t))
    tracker = PathTracker(
        model, refs, opt, loss_fn=loss_fn, probe_batches=[(X[:8], Y[:8]), (X[8:16], Y[8:16])], probe_every=1,
        full_batch=[(X, Y)], weight_decay=0.01, per_tensor=True,
    )
    for step in range(3):
        loss = loss_fn(model, (X[step * 8 : step * 8 + 8], Y[step * 8 : step * 8 + 8]))
        loss.backward()
        with _NoHostConversion():
            tracker.measure(step, loss)
        opt.step()  # the optimizer's own conversions (Adam's step count on CPU) are not ours
        with _NoHostConversion():
            tracker.after_step()
        opt.zero_grad()
    rows = tracker.records  # converted here, outside the measured steps
    kinds = {(r["kind"], r["reference"]) for r in rows}
    assert {k for k, _ in kinds} == {"minibatch", "minibatch_wd", "probe", "probe_wd", "full", "full_wd", "update"}
    assert {ref for _, ref in kinds} == {"xstar", "x0"}
    assert all(isinstance(r["loss"], float) for r in rows if r["kind"] == "minibatch")
    assert len(tracker.per_tensor_records) == 3 * 2 * 6  # steps x references x tensors (with BatchNorm)


def test_several_references_match_fp64():
    torch.manual_seed(0)
    model = tiny_model()
    x0 = Reference.from_model(model, name="x0")
    xstar = Reference([n for n, _ in model.named_parameters()], [torch.randn_like(p) for p in model.parameters()])
    model, tracker, history, *_ = run("adam", probes=False, xstar=xstar, seed=0)
    # the run re-creates the model from seed 0, so x0 above is its starting point
    tracker2 = None
    torch.manual_seed(0)
    m = tiny_model()
    opt = OPTIMIZERS["adam"](m.parameters())
    tracker2 = PathTracker(m, [xstar, x0], opt)
    X, Y = data()
    for step in range(6):
        idx = slice((step * 16) % 64, (step * 16) % 64 + 16)
        loss = loss_fn(m, (X[idx], Y[idx]))
        opt.zero_grad()
        loss.backward()
        with tracker2.step(step, loss):
            opt.step()
    rows = {(r["step"], r["kind"], r["reference"]): r for r in tracker2.records}
    for step, (before, grads, after) in enumerate(history):
        x, g = flat(before), flat(grads)
        for name, ref in (("xstar", flat(xstar.tensors)), ("x0", flat(x0.tensors))):
            for kind, vec in (("minibatch", g), ("update", x - flat(after))):
                want = abc(vec, x, ref)
                row = rows[(step, kind, name)]
                got = torch.tensor([row["a"], row["b"], row["c"]], dtype=torch.float64)
                scale = torch.sqrt(want[1] * want[2])
                assert abs(got[0] - want[0]) <= 1e-5 * scale + 1e-12, (step, kind, name, got, want)
                assert torch.allclose(got[1:], want[1:], rtol=1e-5, atol=1e-14), (step, kind, name, got, want)
    assert rows[(0, "minibatch", "x0")]["c"] == 0.0  # x_0 measured against itself
    with pytest.raises(ValueError, match="two references are named 'xstar'"):
        PathTracker(m, [xstar, xstar])


def test_step_without_gradient_is_an_error_and_zero_gradient_warns():
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathTracker(model, Reference([n for n, _ in model.named_parameters()], [torch.randn_like(p) for p in model.parameters()]), opt)
    with pytest.raises(RuntimeError, match="step 0 has no gradient at all"):
        tracker.measure(0)
    X, Y = data()
    loss_fn(model, (X, Y)).backward()
    opt.zero_grad(set_to_none=False)  # gradients present but zero
    with tracker.step(1):
        opt.step()
    with pytest.warns(RuntimeWarning, match="gradient measured at step 1 is exactly zero"):
        tracker.records
