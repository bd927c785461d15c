"""Update rows against the realised step x_t - x_{t+1}, recomputed in fp64 from torch.cat copies."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.tracker import PathTracker, Reference


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def abc(u, x, r):
    d = x - r
    return torch.stack([u @ d, u @ u, d @ d])


class TwoPath(torch.nn.Module):
    """A layer ("side") used only on odd steps: its .grad is None on even steps after zero_grad()."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.side = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x, use_side=True):
        h = torch.tanh(self.inp(x))
        if use_side:
            h = h + torch.tanh(self.side(h))
        return self.out(h)


OPTIMIZERS = {
    "sgd": dict(lr=0.2),
    "sgd_wd": dict(lr=0.2, weight_decay=0.05),
    "momentum": dict(lr=0.1, momentum=0.9),
    "momentum_wd_dampening": dict(lr=0.1, momentum=0.9, weight_decay=0.05, dampening=0.2),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": dict(cls=torch.optim.AdamW, lr=0.01, weight_decay=0.1),
}
MODES = {"sgd": "sgd", "sgd_wd": "sgd", "momentum": "momentum", "momentum_wd_dampening": "momentum", "nesterov": "copy",
         "adamw": "copy"}


def _run(opt_kw, dtype, clip=None, grad_none=False, steps=6, api="tracker", tmp_path=None, seed=0, inside=None, xstar=None):
    torch.manual_seed(seed)
    model = TwoPath().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    X, Y = torch.randn(96, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (96,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    if xstar is None:
        xstar = Reference(names, [p.detach() + 0.5 * torch.randn_like(p) for p in model.parameters()])
    opt_kw = dict(opt_kw)
    opt = opt_kw.pop("cls", torch.optim.SGD)(model.parameters(), **opt_kw)
    if api == "tracker":
        geo = PathTracker(model, xstar, opt)
    else:
        geo = StepMeasurer(xstar, every=1, final_rtol=None)
    realised = []
    for step in range(steps):
        use_side = not (grad_none and step % 2 == 0)
        out = model(X[step * 16 : step * 16 + 16], use_side=use_side)
        loss = F.cross_entropy(out, Y[step * 16 : step * 16 + 16])
        loss.backward()
        x = flat(model.parameters())
        ctx = geo.step(step, loss) if api == "tracker" else geo.step(model, opt, step, loss)
        with ctx:
            if clip is not None:  # clipped inside the measured step, no flag given
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                assert float(norm) > clip  # clipping is active
            opt.step()
            if inside is not None:
                inside(model, opt)
        realised.append((step, x, flat(model.parameters())))
        opt.zero_grad()  # set_to_none: the unused layer has .grad None at the next even step
    tracker = geo if api == "tracker" else geo.tracker
    return tracker, realised, flat(xstar.tensors)


def _check(tracker, realised, r, rel=1e-6):
    rows = {r_["step"]: r_ for r_ in tracker.records if r_["kind"] == "update"}
    assert sorted(rows) == [s for s, _, _ in realised]
    for step, x, x_next in realised:
        want = abc(x - x_next, x, r)
        row = rows[step]
        assert abs(row["a"] - float(want[0])) <= rel * float(torch.sqrt(want[1] * want[2])), (step, row, want)
        assert row["b"] == pytest.approx(float(want[1]), rel=rel), (step, row, want)
        assert row["c"] == pytest.approx(float(want[2]), rel=rel), (step, row, want)
        assert row["rsi"] == pytest.approx(float(want[0] / want[2]), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
@pytest.mark.parametrize("grad_none", [False, True], ids=["allgrads", "gradnone"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_update_rows_equal_the_realised_step_fp64(opt_name, grad_none, clip):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the identities must hold: no mismatch warning, no fallback
        tracker, realised, r = _run(OPTIMIZERS[opt_name], torch.float64, clip=clip, grad_none=grad_none)
        _check(tracker, realised, r, rel=1e-6)
    assert tracker.update_mode == MODES[opt_name]


@pytest.mark.parametrize("opt_name", ["sgd", "momentum"])
def test_replay_whose_last_step_lands_on_xstar_is_not_a_mismatch(opt_name):
    """The protocol's own case: x* is the end of the same path, so the last step lands exactly on
    x* (||x_T - x*||^2 = 0) while tiny fp32 steps (a schedule's last learning rates) make c, a, b
    tiny: the rounding of x_{t+1} to fp32 (relative to ||x||, not to the step) must be allowed for."""
    kw = dict(OPTIMIZERS[opt_name], lr=1e-6)
    _, realised, _ = _run(kw, torch.float32, steps=4)  # run 1
    final = realised[-1][2]
    model = TwoPath()
    names, tensors, i = [n for n, _ in model.named_parameters()], [], 0
    for p in model.parameters():
        tensors.append(final[i : i + p.numel()].reshape(p.shape).float())
        i += p.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check runs when rows are read: no mismatch reported
        tracker, realised2, r = _run(kw, torch.float32, steps=4, xstar=Reference(names, tensors))  # run 2
        rows = [row for row in tracker.records if row["kind"] == "update"]
    assert float(realised2[-1][2].sub(r).abs().max()) == 0.0  # the replay ends exactly at x*
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for row in rows:  # a mismatch would have left a, b and the ratios NaN
        assert all(map(math.isfinite, (row["a"], row["b"], row["c"], row["rsi"]))), row
    assert rows[-1]["cos"] == pytest.approx(1.0, abs=0.05)  # the last step goes straight to x*
    assert tracker.update_mode == MODES[opt_name]


@pytest.mark.parametrize("opt_name", ["sgd_wd", "momentum_wd_dampening"])
def test_update_rows_fp32_with_clipping_and_grad_none(opt_name):
    """fp32 parameters: the realised step carries x_{t+1}'s rounding; the rows stay within 1e-5
    and no mismatch is reported (the check's tolerance covers rounding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker, realised, r = _run(OPTIMIZERS[opt_name], torch.float32, clip=0.05, grad_none=True)
        _check(tracker, realised, r, rel=1e-5)


def test_clipping_in_step_measurer_without_the_flag():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker, realised, r = _run(OPTIMIZERS["sgd"], torch.float64, clip=0.05, api="measurer")
        _check(tracker, realised, r)
    assert tracker.update_mode == "sgd"  # no copy needed


def _scheduler_inside(model, opt):
    for g in opt.param_groups:
        g["lr"] *= 0.5  # changed after the step: the step used the old lr, the identity keeps it


def test_lr_changed_after_the_step_inside_the_block_is_followed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker, realised, r = _run(OPTIMIZERS["momentum"], torch.float64, inside=_scheduler_inside)
        _check(tracker, realised, r)


def _clamp_inside(model, opt):
    with torch.no_grad():
        for p in model.parameters():
            p.clamp_(-0.3, 0.3)  # a projection the identities know nothing of


@pytest.mark.parametrize("opt_name", ["sgd_wd", "momentum"])
def test_uncovered_step_warns_once_and_falls_back_to_the_exact_difference(opt_name):
    with pytest.warns(RuntimeWarning, match="does not match the step the parameters took") as rec:
        tracker, realised, r = _run(OPTIMIZERS[opt_name], torch.float64, inside=_clamp_inside, steps=6)
        rows = {row["step"]: row for row in tracker.records if row["kind"] == "update"}
        tracker.records  # reading again does not warn again
    assert sum("does not match" in str(w.message) for w in rec) == 1
    assert "Likely cause" in str(rec[0].message) and "projection or clamp" in str(rec[0].message)
    # rows are read only at the end: every identity-derived mismatched row is undefined, not a number
    bad = [s for s, row in rows.items() if row["a"] != row["a"]]
    assert bad, rows
    for s in bad:
        assert all(rows[s][k] != rows[s][k] for k in ("a", "b", "rsi", "eb", "cos", "eta_star"))
    # the measurer switches to the exact difference at the next measured step
    assert tracker.update_mode == "copy"
    model_rows = []
    for step, x, x_next in realised:
        row = rows[step]
        if row["a"] == row["a"]:
            want = abc(x - x_next, x, r)
            assert abs(row["a"] - float(want[0])) <= 1e-6 * float(torch.sqrt(want[1] * want[2]))
            assert row["b"] == pytest.approx(float(want[1]), rel=1e-6)
            model_rows.append(step)


def test_fallback_rows_after_a_mismatch_equal_the_realised_step():
    """Read after every step (as a logger would): the first mismatched row is NaN, every row from
    the next measured step on is the exact difference, equal to the realised step."""
    torch.manual_seed(0)
    model = TwoPath().double()
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(96, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (96,), generator=gen)
    xstar = Reference([n for n, _ in model.named_parameters()], [p.detach() + torch.randn_like(p) for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    tracker = PathTracker(model, xstar, opt)
    r = flat(xstar.tensors)
    seen = []
    with pytest.warns(RuntimeWarning, match="does not match") as rec:
        for step in range(5):
            F.cross_entropy(model(X[step * 16 : step * 16 + 16]), Y[step * 16 : step * 16 + 16]).backward()
            x = flat(model.parameters())
            with tracker.step(step):
                opt.step()
                if step == 1:
                    _clamp_inside(model, opt)
            opt.zero_grad()
            row = [r_ for r_ in tracker.records if r_["kind"] == "update"][-1]
            seen.append((step, row, abc(x - flat(model.parameters()), x, r)))
    assert len([w for w in rec if "does not match" in str(w.message)]) == 1
    for step, row, want in seen:
        if step == 1:
            assert row["a"] != row["a"] and row["rsi"] != row["rsi"]
        else:
            assert row["a"] == pytest.approx(float(want[0]), rel=1e-6)
            assert row["b"] == pytest.approx(float(want[1]), rel=1e-6)
    assert tracker.update_mode == "copy"


def test_a_nan_run_is_not_reported_as_an_identity_mismatch():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    xstar = Reference.from_model(model)
    with torch.no_grad():
        for t in xstar.tensors:
            t.add_(torch.randn_like(t))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathTracker(model, xstar, opt)
    x = torch.randn(8, 4, dtype=torch.float64)
    for step in range(3):
        model(x).sum().backward()
        if step == 1:
            model.weight.grad[0, 0] = float("nan")
        with tracker.step(step):
            opt.step()
        opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = [r for r in tracker.records if r["kind"] == "update"]
    assert rows[0]["a"] == rows[0]["a"] and rows[1]["a"] != rows[1]["a"]
