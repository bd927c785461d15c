"""A custom Accelerate loop (accelerator.backward, accumulation, accelerator.clip_grad_norm_)
measured before clipping, and the plain-loop hook under DDP (2 gloo processes) giving the
single-process numbers."""

import json
import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import PreClipCapture, Warnings, assert_metrics, flat, geo, perturbed_reference

from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.integrations.common import trajectory_path


def accelerate_run(geo_m, tmp_path, lr=3e-3, steps=5, setup=None, norms=None):
    accelerate = pytest.importorskip("accelerate", reason="install the hf extra (accelerate)")
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(4)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=gen) * 3, torch.randint(0, 3, (40,), generator=gen))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    if setup is not None:
        setup(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step, step_loss, out, micro = 0, 0.0, [], []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            micro.append(float(loss.detach()))
            step_loss = step_loss + loss.detach() / 2
            if accelerator.sync_gradients:
                geo_m.before_step(model, optimizer, step, step_loss)
                norm = accelerator.clip_grad_norm_(model.parameters(), 0.2)  # the pre-clip total norm
                if norms is not None:
                    norms.append(float(norm))
            optimizer.step()
            if accelerator.sync_gradients:
                geo_m.after_step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            out.append(geo_m.scalars() if geo_m.measured else None)
            step, step_loss = step + 1, 0.0
            if step == steps:
                break
    return model, out, micro, geo_m.finish()


def test_accelerate_loop_measured_before_clipping(tmp_path):
    """The measured g_t is the accumulated gradient before accelerator.clip_grad_norm_ clips it:
    its norm is the one Accelerate returns, clipping bites (norm > 0.2), and every scalar equals
    an fp64 recomputation from x_t and g_t captured with torch's public hooks."""
    pytest.importorskip("accelerate", reason="install the hf extra (accelerate)")
    torch.manual_seed(0)
    ref = tmp_path / "xstar.safetensors"
    xstar = perturbed_reference(torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)), ref)
    captures, norms = [], []
    with ExitStack() as stack:
        setup = lambda m: captures.append(stack.enter_context(PreClipCapture(m)))  # noqa: E731
        model, out, _, _ = accelerate_run(StepMeasurer(str(ref), every=1, final_rtol=None), tmp_path, setup=setup, norms=norms)
    captured = captures[0].captured
    assert len(out) == len(captured) == len(norms) == 5
    final = flat(model.parameters())
    for t, (s, (x, g)) in enumerate(zip(out, captured)):
        assert norms[t] > 0.2  # clipping was active: a post-clip measurement would differ
        assert math.sqrt(float(g @ g)) == pytest.approx(norms[t], rel=1e-5)  # the g Accelerate clipped
        assert s["pathgeom/eb"] * math.sqrt(float((x - xstar) @ (x - xstar))) == pytest.approx(norms[t], rel=1e-5)
        assert_metrics(s, "pathgeom/", geo(g, x, xstar), f"step {t}")
        x_next = captured[t + 1][0] if t + 1 < len(captured) else final
        assert_metrics(s, "pathgeom/update_", geo(x - x_next, x, xstar), f"step {t}", rel=1e-4)


def test_accelerate_two_run_protocol(tmp_path):
    ref = str(tmp_path / "xstar.safetensors")
    _, _, micro, _ = accelerate_run(StepMeasurer.recorder(ref), tmp_path)
    traj = json.load(open(trajectory_path(ref)))
    assert [traj["losses"][str(t)] for t in range(5)] == pytest.approx([(micro[2 * t] + micro[2 * t + 1]) / 2 for t in range(5)], rel=1e-6)
    with Warnings() as w:
        _, _, _, ratio = accelerate_run(StepMeasurer(ref, every=2, grad_clipping=True), tmp_path)
    assert ratio == 0.0 and not w.matching("StepMeasurer")
    with Warnings() as w:
        _, _, _, ratio = accelerate_run(StepMeasurer(ref, every=2, grad_clipping=True), tmp_path, lr=1e-2)
    assert w.matching("drifts from run 1 at optimizer step 1:") and w.matching("not ~0") and ratio > 0.05


@pytest.mark.distributed
def test_ddp_plain_loop_hook_gives_the_single_process_numbers(tmp_path):
    import dist_workers
    import integ_workers

    dist_workers.launch(integ_workers.ddp_plain_loop, 2, str(tmp_path))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # the same hook in one process on the whole batch, against the x* and trajectory run 1 wrote under DDP
    with Warnings() as w:
        single, single_ratio = integ_workers._run(integ_workers._model(), StepMeasurer(str(tmp_path / "xstar.safetensors"), every=2))
    assert not w.matching("StepMeasurer"), w.matching("")  # its full-batch losses = the mean of the ranks' losses
    assert single_ratio < 1e-5  # the same path up to the summation order of the gradient
    for r, got in enumerate(ranks):
        assert not got["warnings"] and got["ratio"] == 0.0, (r, got["warnings"], got["ratio"])
        for t, (d, s) in enumerate(zip(got["scalars"], single)):
            assert (d is None) == (s is None) == (t % 2 == 1), t
            if s is None:
                continue
            assert set(d) == set(s) and len(d) == 8, sorted(d)
            for pre in ("pathgeom/", "pathgeom/update_"):
                want = {k: s[pre + k] for k in ("rsi", "eb", "cos", "eta_star")}
                assert_metrics(d, pre, want, f"rank {r} step {t}", rel=1e-5)
