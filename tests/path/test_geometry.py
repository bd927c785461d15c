import math

import pytest
import torch

import pathgeom_fast as pg


def test_hand_computed_values():
    g = pg.geometry(torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64), numel=100)
    assert (g.rsi.item(), g.eb.item(), g.cos.item(), g.eta_star.item(), g.contraction.item()) == (2.0, 2.0, 1.0, 0.5, 0.0)
    assert g.chance_cos == 0.1 and g.grad_norm.item() == 2.0 and g.dist.item() == 1.0
    g = pg.geometry(torch.tensor([[-1.0, 4.0, 9.0], [3.0, 1.0, 16.0]], dtype=torch.float64))
    assert torch.allclose(g.rsi, torch.tensor([-1 / 9, 3 / 16], dtype=torch.float64))
    assert torch.allclose(g.eb, torch.tensor([2 / 3, 1 / 4], dtype=torch.float64))
    assert torch.allclose(g.cos, torch.tensor([-1 / 6, 3 / 4], dtype=torch.float64))
    assert torch.allclose(g.eta_star, torch.tensor([-1 / 4, 3.0], dtype=torch.float64))
    assert torch.allclose(g.contraction, torch.tensor([35 / 36, 7 / 16], dtype=torch.float64))


def test_contraction_is_the_distance_after_the_optimal_step():
    torch.manual_seed(0)
    g, x, r = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    geo = pg.geometry(pg.secant_stats([g], [x], [r]))
    after = x - geo.eta_star * g - r
    assert math.isclose(geo.contraction.item(), (after @ after / ((x - r) @ (x - r))).item(), rel_tol=1e-9)


def test_shapes_and_errors():
    assert pg.geometry(torch.rand(4, 5, 3)).rsi.shape == (4, 5)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\]"):
        pg.geometry(torch.rand(4, 2))
    with pytest.raises(ValueError, match="numel must be positive"):
        pg.geometry(torch.rand(3), numel=0)


def test_no_angle_where_g_or_the_distance_is_zero():
    """b c = 0: cos and the contraction are NaN (not +-inf from a rounding-level a); the other
    ratios keep torch's inf/nan. The tracker's rows use the same rule."""
    from pathgeom_fast.tracker import metrics

    g = pg.geometry(torch.tensor([[-1.8e-11, 1.0, 0.0], [0.0, 0.0, 4.0], [1.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.isnan(g.cos).all() and torch.isnan(g.contraction).all()
    assert g.rsi[0].item() == -math.inf and g.eb[0].item() == math.inf and g.eta_star[1].isnan()
    for a, b, c in [(-1.8e-11, 1.0, 0.0), (0.0, 0.0, 4.0)]:
        m = metrics(a, b, c)
        assert math.isnan(m["cos"]), (a, b, c)
    assert metrics(-1.8e-11, 1.0, 0.0)["rsi"] == -math.inf and metrics(3.0, 1.0, 16.0)["cos"] == 0.75
