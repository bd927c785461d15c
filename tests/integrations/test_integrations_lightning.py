"""The Lightning integration with the real lightning.Trainer (accumulation, clipping, a logger).

Logged values are compared with an fp64 recomputation from parameters and gradients captured by
the module's own on_before_optimizer_step (after the callbacks', before clipping)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import Warnings, assert_metrics, capture_logger, flat, geo, grad_of, perturbed_reference, probe_summary

pl = pytest.importorskip("lightning.pytorch", reason="install the lightning extra: pip install --no-build-isolation '.[lightning]'")


from pathgeom_fast.checkpoints import CheckpointError, load_snapshot  # noqa: E402
from pathgeom_fast.integrations.common import trajectory_path  # noqa: E402
from pathgeom_fast.integrations.lightning import PathGeometryCallback  # noqa: E402

GEN = torch.Generator().manual_seed(2)
X, Y = torch.randn(64, 6, generator=GEN) * 3, torch.randint(0, 3, (64,), generator=GEN)
PROBES = [(X[:8], Y[:8]), (X[8:16], Y[8:16]), (X[16:24], Y[16:24])]


class Module(pl.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.lr = lr
        self.captured = []  # (x_t, g_t, probe gradients, full gradient) before clipping
        self.micro_losses = []

    def forward(self, x):  # the default probe loss calls module(inputs)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.micro_losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks', before clipping
        ps = list(self.parameters())
        probes = [grad_of(self, F.cross_entropy(self.net(x), y)) for x, y in PROBES]
        full = grad_of(self, F.cross_entropy(self.net(X), Y))
        self.captured.append((flat(ps), flat(p.grad for p in ps), probes, full))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit(callbacks, lr=0.1, steps=6, log_every=1):
    torch.manual_seed(0)
    module = Module(lr)
    logger = capture_logger()
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=0.1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, log_every_n_steps=log_every,
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
    return module, logger


def test_lightning_logs_pre_clip_geometry_probes_full(tmp_path):
    torch.manual_seed(0)
    ref_path = str(tmp_path / "xstar.safetensors")
    xstar = perturbed_reference(Module(), ref_path)
    base, base_logger = fit([], log_every=3)
    cb = PathGeometryCallback(ref_path, every=1, probe_batches=PROBES, full_batch=[(X[:32], Y[:32]), (X[32:], Y[32:])], probe_every=2, final_rtol=None)
    module, logger = fit([cb], log_every=3)
    rows = [(s, m) for s, m in logger.rows if "pathgeom/rsi" in m]
    assert [s for s, _ in rows] == list(range(6)) and len(module.captured) == 6  # each measured step once, its own step
    assert cb.measurer.tracker.update_mode == "momentum"
    # written when Lightning writes its own metrics (log_every_n_steps=3: steps 2 and 5), not later
    order = [(s, "pathgeom" if "pathgeom/rsi" in m else "final" if "pathgeom/final_distance_ratio" in m else "own") for s, m in logger.rows]
    assert order.index((2, "own")) > order.index((2, "pathgeom")) and order.index((5, "own")) > order.index((5, "pathgeom")), order
    assert order.index((1, "pathgeom")) < order.index((2, "own")) and order.index((4, "pathgeom")) > order.index((2, "own")), order
    final = flat(module.parameters())
    for t, ((step, m), (x, g, probes, full)) in enumerate(zip(rows, module.captured)):
        assert math.sqrt(float(g @ g)) > 0.1  # clipping was active
        assert_metrics(m, "pathgeom/", geo(g, x, xstar), f"step {t}")
        x_next = module.captured[t + 1][0] if t + 1 < 6 else final
        assert_metrics(m, "pathgeom/update_", geo(x - x_next, x, xstar), f"step {t}", rel=1e-4)  # the update, clipped gradient and momentum included
        if t % 2 == 0:
            assert_metrics(m, "pathgeom/probe_", probe_summary(probes, x, xstar), f"step {t}")
            assert_metrics(m, "pathgeom/full_", geo(full, x, xstar), f"step {t}")
        else:
            assert "pathgeom/probe_rsi" not in m
    # the module's own metrics are the same as without the callback
    own = [(s, {k: v for k, v in m.items() if not k.startswith("pathgeom/")}) for s, m in logger.rows]
    assert [r for r in own if r[1]] == [r for r in base_logger.rows if r[1]]
    assert [s for s, m in logger.rows if "pathgeom/final_distance_ratio" in m] == [6]


def test_lightning_two_run_protocol(tmp_path):
    ref = str(tmp_path / "xstar.safetensors")
    with Warnings() as w:
        module1, _ = fit([PathGeometryCallback.record_reference(ref)])
    assert not w.matching("PathGeometryCallback")
    state, meta = load_snapshot(ref)
    for n, p in module1.named_parameters():
        assert torch.equal(state[n], p.detach()), n
    traj = json.load(open(trajectory_path(ref)))
    ml = module1.micro_losses  # the loss of an optimizer step: the mean over its two micro-batches
    assert [traj["losses"][str(t)] for t in range(6)] == pytest.approx([(ml[2 * t] + ml[2 * t + 1]) / 2 for t in range(6)], rel=1e-6)

    cb = PathGeometryCallback(ref, every=2)
    with Warnings() as w:
        _, logger = fit([cb])
    assert not w.matching("PathGeometryCallback"), w.matching("")
    assert cb.final_distance_ratio == 0.0
    assert [m["pathgeom/final_distance_ratio"] for _, m in logger.rows if "pathgeom/final_distance_ratio" in m] == [0.0]
    # the tracker's rows carry the same loss (the last micro-batch is added after the measurement)
    rows = [r for r in cb.measurer.records if r["kind"] == "minibatch"]
    assert [(r["step"], r["loss"]) for r in rows] == [(t, traj["losses"][str(t)]) for t in (0, 2, 4)]
    summary = cb.write_report(str(tmp_path / "report"))  # the report of the measured steps
    written = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert written["replay_final_distance_ratio"] == 0.0 and written["numel"] == summary["numel"] > 0
    from pathgeom_fast import report

    csv_rows = [r for r in report.read_csv(str(tmp_path / "report" / "records.csv")) if r["kind"] == "minibatch"]
    assert [(r["step"], r["rsi"]) for r in csv_rows] == [(r["step"], pytest.approx(r["rsi"], rel=1e-12)) for r in rows]
    assert (tmp_path / "report" / "findings.md").is_file() and (tmp_path / "report" / "records.csv").is_file()

    cb = PathGeometryCallback(ref, every=2)
    with Warnings() as w:
        fit([cb], lr=0.2)  # another learning rate: flagged
    assert len(w.matching("drifts from run 1 at optimizer step 1:")) == 1, w.matching("")
    assert len(w.matching("not ~0")) == 1
    assert cb.final_distance_ratio > 0.1


def test_lightning_checkpoint_as_reference(tmp_path):
    """x* straight from the .ckpt that Lightning's ModelCheckpoint wrote at the end of run 1."""
    torch.manual_seed(0)
    module1 = Module()
    trainer = pl.Trainer(
        max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.1, logger=False, default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(module1, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    xstar = flat(module1.parameters())
    cb = PathGeometryCallback(str(ckpt), every=1)  # read with weights_only=True, "net." keys matched to the module
    module, logger = fit([cb])
    rows = [m for _, m in logger.rows if "pathgeom/rsi" in m]
    assert len(rows) == len(module.captured) == 6
    for t, (m, (x, g, _, _)) in enumerate(zip(rows, module.captured)):
        assert_metrics(m, "pathgeom/", geo(g, x, xstar), f"step {t}")
    assert cb.final_distance_ratio == 0.0  # the same run, so it ends at the checkpoint


def test_lightning_bad_reference_fails_before_training(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"net.0.weight": torch.randn(16, 6), "net.0.bias": torch.randn(16)}, str(bad))
    with pytest.raises(KeyError, match=rf"{bad} lacks 2 of the model's 4 trainable parameters, first 'net\.2\.weight'"):
        fit([PathGeometryCallback(str(bad))])


class TwoOptimizers(Module):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.manual_backward(loss)
        first.step()
        second.step()
        first.zero_grad()
        second.zero_grad()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_lightning_manual_optimization_refused_before_training(tmp_path):
    """Manual optimization with two optimizers: refused with a clear message in on_fit_start,
    before any step (rather than measuring each optimizer's half-step as a step)."""
    ref_path = str(tmp_path / "xstar.safetensors")
    perturbed_reference(Module(), ref_path)
    module = TwoOptimizers()
    trainer = pl.Trainer(max_steps=2, logger=False, callbacks=[PathGeometryCallback(ref_path)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    before = flat(module.parameters())
    with pytest.raises(ValueError, match=r"automatic optimization and one optimizer; this module has automatic_optimization=False and 2 optimizers"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
    assert torch.equal(flat(module.parameters()), before)  # no training step ran
