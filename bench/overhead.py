"""Per-step overhead of measuring the geometry while training, in % of the step time.

    python bench/overhead.py [--device cpu|cuda] [--out FILE]

* tracker: a plain loop with PathTracker measuring the minibatch gradient and the update
  every step (SGD with momentum: no parameter copy; AdamW: one copy), on the demo's MLP
  (26k parameters, digits) and on a wider MLP (about 10M parameters, random data).
* hf / lightning: the framework callbacks on a tiny GPT-2 (HF Trainer) and an MLP (Lightning),
  every step, against the same training without the callback.
Each configuration is timed twice, alternating with its baseline; the faster of each is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from pathgeom_fast.snapshots import save_snapshot
from pathgeom_fast.tracker import PathTracker, Reference


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plain_loop(make_model, data, steps, device, optimizer, measure, xstar=None):
    torch.manual_seed(0)
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optimizer == "momentum" else torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = PathTracker(model, Reference(xstar[0], xstar[1]), opt) if measure else None
    X, Y = data
    bs = 64
    for s in range(steps + 5):
        if s == 5:  # warm-up steps excluded
            _sync(device)
            t0 = time.perf_counter()
        i = (s * bs) % (len(X) - bs)
        loss = F.cross_entropy(model(X[i : i + bs]), Y[i : i + bs])
        loss.backward()
        if tracker is not None:
            with tracker.step(s, loss.detach()):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def tracker_rows(device, steps):
    from pathgeom_fast.demo import make_data, make_model

    X, Y = make_data(device)
    wide = lambda: torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
    rows = []
    for name, mk in (("demo MLP 26k", make_model), ("MLP 8.5M", wide)):
        m = mk()
        xstar = ([n for n, _ in m.named_parameters()], [p.detach().to(device) + 0.01 for p in m.parameters()])
        nparams = sum(p.numel() for p in m.parameters())
        for opt in ("momentum", "adamw"):
            base = min(plain_loop(mk, (X, Y), steps, device, opt, False) for _ in range(2))
            meas = min(plain_loop(mk, (X, Y), steps, device, opt, True, xstar) for _ in range(2))
            rows.append((f"tracker, {name} ({nparams / 1e6:.2f}M), {opt}", base, meas))
    return rows


def hf_rows(steps):
    import transformers

    from pathgeom_fast.integrations.hf import PathGeometryCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=512, n_positions=64)
    ids = torch.randint(0, 512, (steps * 8 + 64, 64), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in ids]
    tmp = tempfile.mkdtemp()
    ref = os.path.join(tmp, "x.safetensors")
    save_snapshot(transformers.GPT2LMHeadModel(cfg), ref, 0)

    def run(measure):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=8, max_steps=steps, logging_steps=10**6, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        if measure:
            PathGeometryCallback.attach(trainer, reference=ref)
        t0 = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - t0) / steps

    n = sum(p.numel() for p in transformers.GPT2LMHeadModel(cfg).parameters())
    base = min(run(False) for _ in range(2))
    meas = min(run(True) for _ in range(2))
    return [(f"HF Trainer, GPT-2 2x128 ({n / 1e6:.2f}M), AdamW", base, meas)]


def lightning_rows(steps):
    import lightning.pytorch as pl

    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))

        def training_step(self, batch, i):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    gen = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(steps * 64, 64, generator=gen), torch.randint(0, 10, (steps * 64,), generator=gen))
    tmp = tempfile.mkdtemp()
    ref = os.path.join(tmp, "x.safetensors")
    save_snapshot(M(), ref, 0)

    def run(measure):
        torch.manual_seed(0)
        cbs = [PathGeometryCallback(ref)] if measure else []
        tr = pl.Trainer(max_steps=steps, logger=False, callbacks=cbs, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
        t0 = time.perf_counter()
        tr.fit(M(), torch.utils.data.DataLoader(ds, batch_size=64))
        return (time.perf_counter() - t0) / steps

    n = sum(p.numel() for p in M().parameters())
    base = min(run(False) for _ in range(2))
    meas = min(run(True) for _ in range(2))
    return [(f"Lightning, MLP ({n / 1e6:.2f}M), SGD momentum", base, meas)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args()
    rows = tracker_rows(a.device, a.steps)
    if a.device == "cpu":
        for fn, steps in ((hf_rows, 30), (lightning_rows, 100)):
            try:
                rows += fn(steps)
            except ImportError as exc:
                print(f"skipped {fn.__name__}: {exc}", file=sys.stderr)
    head = f"{'configuration':<52}{'step ms':>10}{'measured ms':>13}{'overhead':>10}"
    lines = [f"{torch.__version__}, device {a.device}, {time.strftime('%Y-%m-%d')}", head, "-" * len(head)]
    for name, base, meas in rows:
        lines.append(f"{name:<52}{base * 1e3:>10.2f}{meas * 1e3:>13.2f}{(meas / base - 1) * 100:>9.1f}%")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
