"""The lagged orthogonal cosine (PathTracker(lags=...)) against an fp64 recomputation from
flattened copies of every gradient and iterate (the paper's way)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pathgeom_fast.tracker import PathTracker, Reference


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def tiny():
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


OPTS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01),
}


def run(opt_name="sgd", steps=14, lags=(1, 2, 5), lag_every=3, extra_refs=False, seed=0):
    torch.manual_seed(seed)
    model = tiny()
    opt = OPTS[opt_name](model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    X, Y = torch.randn(96, 5, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    xstar = Reference(names, [p.detach() + torch.randn(p.shape, generator=gen) for p in model.parameters()])
    refs = [xstar]
    if extra_refs:  # lagged rows are measured against the primary reference only
        refs.append(Reference(names, [torch.randn(p.shape, generator=gen) for p in model.parameters()], name="other"))
    tracker = PathTracker(model, refs, opt, loss_fn=loss_fn, lags=lags, lag_every=lag_every)
    xs, gs, live = [], [], []
    for step in range(steps):
        idx = slice((step * 16) % 96, (step * 16) % 96 + 16)
        loss = loss_fn(model, (X[idx], Y[idx]))
        loss.backward()
        xs.append(flat(model.parameters()))
        gs.append(flat(p.grad for p in model.parameters()))
        with tracker.step(step, loss):
            opt.step()
        opt.zero_grad()
        live.append(len(tracker._anchors))
    return tracker, xs, gs, flat(xstar.tensors), live


def perp(g, x, r):
    d = x - r
    return g - (g @ d) / (d @ d) * d


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_lagged_rows_match_fp64(opt_name):
    lags, every, steps = (1, 2, 5), 3, 14
    tracker, xs, gs, r, _ = run(opt_name, steps, lags, every, extra_refs=True)
    rows = [row for row in tracker.records if row["kind"] == "lagged"]
    want_keys = {(t, k) for t in range(0, steps, every) for k in lags if t + k < steps}
    assert {(row["step"], row["sample"]) for row in rows} == want_keys
    assert {row["reference"] for row in rows} == {"xstar"}
    for row in rows:
        t, k = row["step"], row["sample"]
        pt, ps = perp(gs[t], xs[t], r), perp(gs[t + k], xs[t + k], r)
        # the orthogonal components really are orthogonal to their own x - x* (sanity of the oracle)
        assert abs(pt @ (xs[t] - r)) <= 1e-9 * pt.norm() * (xs[t] - r).norm()
        a, b, c = pt @ ps, ps @ ps, pt @ pt
        assert row["a"] == pytest.approx(a.item(), abs=1e-5 * math.sqrt(b * c))
        assert row["b"] == pytest.approx(b.item(), rel=1e-5)
        assert row["c"] == pytest.approx(c.item(), rel=1e-5)
        assert row["cos"] == pytest.approx((a / (b * c).sqrt()).item(), abs=1e-5)
        assert row["rsi"] is None and row["eb"] is None and row["eta_star"] is None
    # the lagged rows are not random: lag-1 components of a smooth path are correlated
    assert any(abs(row["cos"]) > 0.05 for row in rows)


def test_anchors_are_dropped_after_their_largest_lag():
    lags, every, steps = (1, 2, 5), 2, 20
    tracker, *_, live = run("sgd", steps, lags, every)
    # anchors t with step - t < 5 stay: at most ceil(5 / 2) = 3 copies at once
    assert max(live) == math.ceil(max(lags) / every)
    with pytest.warns(RuntimeWarning, match="did not retrace"):  # x* is random here, not the run's end
        tracker.finish()
    assert tracker._anchors == []


def test_more_lags_than_one_gram_call_takes():
    """9 anchors due at once: split over two secant_gram calls (at most 8 vector lists each)."""
    lags, steps = tuple(range(1, 10)), 12
    tracker, xs, gs, r, _ = run("sgd", steps, lags, lag_every=1)
    rows = {(row["step"], row["sample"]): row for row in tracker.records if row["kind"] == "lagged"}
    assert len(rows) == sum(1 for t in range(steps) for k in lags if t + k < steps)
    for (t, k), row in rows.items():
        pt, ps = perp(gs[t], xs[t], r), perp(gs[t + k], xs[t + k], r)
        assert row["cos"] == pytest.approx((pt @ ps / (pt.norm() * ps.norm())).item(), abs=1e-5), (t, k)


def test_lag_options_are_checked():
    model = tiny()
    ref = Reference.from_model(model)
    with pytest.raises(ValueError, match="lags must be positive"):
        PathTracker(model, ref, lags=[0, 1])
    with pytest.raises(ValueError, match="lag_every must be >= 1"):
        PathTracker(model, ref, lags=[1], lag_every=0)


def test_lagged_step_does_no_host_conversion():
    from test_tracker import _NoHostConversion

    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference.from_model(model)
    with torch.no_grad():
        for t in ref.tensors:
            t.add_(torch.randn_like(t))
    tracker = PathTracker(model, ref, opt, loss_fn=loss_fn, lags=(1, 2), lag_every=1)
    X, Y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    for step in range(4):
        loss = loss_fn(model, (X[step * 6 : step * 6 + 6], Y[step * 6 : step * 6 + 6]))
        loss.backward()
        with _NoHostConversion():
            tracker.measure(step, loss)
        opt.step()
        with _NoHostConversion():
            tracker.after_step()
        opt.zero_grad()
    assert len([r for r in tracker.records if r["kind"] == "lagged"]) == 3 + 2
