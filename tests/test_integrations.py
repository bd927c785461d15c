"""Framework integrations with the real libraries: HF Trainer, Lightning, a plain loop.

Each logged value is compared with an fp64 recomputation (torch.cat) from gradients and
parameters captured independently of the integration, before clipping.
"""

import importlib
import math
import sys

import pytest
import torch

from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.snapshots import list_snapshots, save_snapshot


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def geo(g, x, r):
    d = x - r
    a, b, c = g @ d, g @ g, d @ d
    return {"rsi": (a / c).item(), "eb": math.sqrt(b / c), "cos": (a / torch.sqrt(b * c)).item(), "eta_star": (a / b).item()}


def perturbed_reference(model, path, seed=0):
    """Write x* = the model's parameters plus noise to `path`; return them in order."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    save_file({n: t.contiguous() for n, t in state.items()}, path)
    return [state[n] for n, _ in model.named_parameters()]


def test_hf_trainer_logs_pre_clip_geometry(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install 'pathgeom_fast[hf]'")
    from pathgeom_fast.integrations.hf import PathGeometryCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (48, 16), generator=gen)]
    ref_path = str(tmp_path / "xstar.safetensors")
    xstar = flat(perturbed_reference(model, ref_path))

    captured = []  # (x_t, g_t) seen by torch's clip_grad_norm_, i.e. before clipping
    orig_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        captured.append((flat(parameters), flat([p.grad for p in parameters])))
        return orig_clip(parameters, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-3, max_grad_norm=0.5, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    PathGeometryCallback.attach(trainer, reference=ref_path, every=1, snapshot_dir=str(tmp_path / "snaps"), snapshot_every=2)
    trainer.train()

    logged = [h for h in trainer.state.log_history if "pathgeom/rsi" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert len(captured) == 4  # one clip per optimizer step, after 2 accumulated micro-batches
    final = flat(model.parameters())
    for t, (h, (x, g)) in enumerate(zip(logged, captured)):
        assert math.sqrt(float(g @ g)) > 0.5  # clipping was active: a post-clip measurement would differ
        want = geo(g, x, xstar)
        for k, v in want.items():
            assert h[f"pathgeom/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-9), (t, k)
        x_next = captured[t + 1][0] if t + 1 < len(captured) else final
        want_u = geo(x - x_next, x, xstar)  # the update AdamW took
        assert h["pathgeom/update_rsi"] == pytest.approx(want_u["rsi"], rel=1e-4, abs=1e-9)
        assert h["pathgeom/update_eb"] == pytest.approx(want_u["eb"], rel=1e-4)
    assert [s for s, _ in list_snapshots(str(tmp_path / "snaps"))] == [0, 2]


def test_hf_callback_needs_attach(tmp_path):
    pytest.importorskip("transformers", reason="install the hf extra")
    from pathgeom_fast.integrations.hf import PathGeometryCallback

    model = torch.nn.Linear(2, 2)
    path = str(tmp_path / "x.safetensors")
    save_snapshot(model, path, 0)
    cb = PathGeometryCallback(path)
    with pytest.raises(RuntimeError, match=r"PathGeometryCallback.attach\(trainer"):
        cb.on_train_begin(None, None, None)


def test_lightning_logs_pre_clip_geometry(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="install the lightning extra: pip install 'pathgeom_fast[lightning]'")
    from lightning.pytorch.loggers import Logger

    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    class Capture(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "capture"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            self.captured = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):  # runs after the callbacks', before clipping
            self.captured.append((flat(self.parameters()), flat([p.grad for p in self.parameters()])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    module = Module()
    ref_path = str(tmp_path / "xstar.safetensors")
    xstar = flat(perturbed_reference(module, ref_path))
    gen = torch.Generator().manual_seed(2)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=gen) * 3, torch.randint(0, 3, (64,), generator=gen))
    logger = Capture()
    cb = PathGeometryCallback(ref_path, every=1)
    trainer = pl.Trainer(
        max_steps=4, accumulate_grad_batches=2, gradient_clip_val=0.1, logger=logger, callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, log_every_n_steps=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=8))
    rows = [m for _, m in logger.rows if "pathgeom/rsi" in m]
    assert len(rows) == len(module.captured) == 4
    assert cb.measurer.tracker.update_mode == "momentum"
    for m, (x, g) in zip(rows, module.captured):
        assert math.sqrt(float(g @ g)) > 0.1  # clipping was active
        for k, v in geo(g, x, xstar).items():
            assert m[f"pathgeom/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-9), k


def test_plain_loop_example(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    path = str(tmp_path / "x.safetensors")
    xstar = flat(perturbed_reference(model, path))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    geo_m = StepMeasurer(reference=path, every=2)
    seen = []
    for step in range(5):
        loss = model(torch.randn(4, 5)).pow(2).mean()
        loss.backward()
        x, g = flat(model.parameters()), flat([p.grad for p in model.parameters()])
        with geo_m.step(model, opt, step, loss):
            opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            seen.append((step, geo(g, x, xstar), geo_m.scalars()))
    assert [s for s, _, _ in seen] == [0, 2, 4]
    for _, want, got in seen:
        for k, v in want.items():
            assert got[f"pathgeom/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("module, extra, package", [("hf", "hf", "transformers"), ("lightning", "lightning", "lightning")])
def test_missing_framework_names_the_extra(monkeypatch, module, extra, package):
    for name in list(sys.modules):
        if name == package or name.startswith(package + ".") or name == "pytorch_lightning" or name.endswith(f"integrations.{module}"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    if package == "lightning":
        monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match=rf"pip install 'pathgeom_fast\[{extra}\]'"):
        importlib.import_module(f"pathgeom_fast.integrations.{module}")
