"""Per-step overhead of each integration, measuring every step and every 10th step.

    python bench/overhead.py [--steps 30] [--repeats 2] [--out FILE]

For each integration the same training runs three ways, side by side in one process:
without measurement, with ``every=1`` and with ``every=10`` (the gradient before clipping and
the update the optimizer took, against a reference x*, logged through the integration):

* plain loop (``StepMeasurer``), MLP of 13.1M parameters, SGD with momentum (the update comes
  from the momentum buffer: no copy) and AdamW (one parameter copy);
* Hugging Face ``Trainer`` (``PathGeometryCallback.attach``), GPT-2 of 11.4M parameters, AdamW,
  gradient accumulation 2, clipping, scalars through ``Trainer.log``;
* Lightning (``PathGeometryCallback``), the MLP, SGD with momentum, clipping, a CSV logger;
* an Accelerate loop (``accelerator.backward``/``clip_grad_norm_`` + ``StepMeasurer``), the MLP,
  AdamW, accumulation 2.

Two figures per run: the step time end to end, against the run without measurement, and the
CPU time spent inside the integration's own hooks in that same run (attributed in situ, so
free of run-to-run noise; costs outside the hooks, e.g. TensorBoard writing the logged
scalars, are only in the first). A step is timed from the end of one optimizer step to the end of the next (framework hooks,
logging and data loading included), averaged over the steps after the warm-up, so that
``every=10`` includes its measured steps. The time is the process's **CPU time**
(``time.process_time``) with torch on one thread: on a machine shared with other jobs the
wall-clock time of a step varies several-fold with their load, the CPU time of a
single-threaded process much less (memory-bandwidth contention remains). Each configuration is
run ``--repeats`` times, alternating with the others, and its fastest run kept; compare the
columns of one row. The wall-clock time of the fastest baseline run is shown for scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from pathgeom_fast.integrations import StepMeasurer
from pathgeom_fast.snapshots import save_snapshot

WARMUP = 5
EVERY = (None, 1, 10)  # None: no measurement


def mlp():
    torch.manual_seed(0)
    h = 2048
    return torch.nn.Sequential(
        torch.nn.Linear(256, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
        torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 10),
    )


def mlp_data(n):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 256, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def reference_for(model, tmp, name):
    """x* = the initial parameters plus a small shift (what is measured does not change the cost)."""
    path = os.path.join(tmp, f"{name}.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    save_snapshot(model, path, 0)
    return path


class HookTimer:
    """CPU time spent inside the integration's own entry points (methods of `obj`), so that the
    cost of measuring is also attributed inside the measured run itself, free of run-to-run noise."""

    def __init__(self, obj=None, names=()):
        self.total = 0.0
        for name in names:
            fn = getattr(obj, name)

            def timed(*args, _fn=fn, **kwargs):
                t0 = time.process_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.total += time.process_time() - t0

            setattr(obj, name, timed)


def stamp(timer: HookTimer | None = None) -> tuple[float, float, float]:
    return time.process_time(), time.perf_counter(), timer.total if timer else 0.0


def per_step(stamps: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(CPU, wall, CPU inside the integration) seconds per optimizer step, from the stamps at the
    end of each step after the warm-up."""
    s = stamps[WARMUP - 1 :]
    n = len(s) - 1
    return tuple((s[-1][i] - s[0][i]) / n for i in range(3))


# ------------------------------------------------------------------------------------------


def plain(every, steps, ref, optimizer):
    model = mlp()
    X, Y = mlp_data(64 * 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optimizer == "momentum" else torch.optim.AdamW(model.parameters(), lr=1e-4)
    geo = StepMeasurer(ref, every=every, final_rtol=None) if every else None
    timer = HookTimer(geo, ("before_step", "after_step", "scalars")) if geo else None
    stamps = []
    for step in range(steps + WARMUP):
        i = (step * 64) % (len(X) - 64)
        loss = F.cross_entropy(model(X[i : i + 64]), Y[i : i + 64])
        loss.backward()
        if geo is None:
            opt.step()
        else:
            with geo.step(model, opt, step, loss):
                opt.step()
            if geo.measured:
                geo.scalars()  # what a logger would read
        opt.zero_grad(set_to_none=True)
        stamps.append(stamp(timer))
    return per_step(stamps)


def accelerate_loop(every, steps, ref):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    X, Y = mlp_data(32 * 2 * (steps + WARMUP))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    geo = StepMeasurer(ref, every=every, final_rtol=None, grad_clipping=True) if every else None
    timer = HookTimer(geo, ("before_step", "after_step", "scalars")) if geo else None
    stamps, step, step_loss = [], 0, 0.0
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            step_loss = step_loss + loss.detach() / 2
            if accelerator.sync_gradients:
                if geo is not None:
                    geo.before_step(model, opt, step, step_loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if accelerator.sync_gradients and geo is not None:
                geo.after_step()
                if geo.measured:
                    geo.scalars()
            opt.zero_grad()
        if accelerator.sync_gradients:
            step, step_loss = step + 1, 0.0
            stamps.append(stamp(timer))
    return per_step(stamps)


def lightning_fit(every, steps, ref, tmp):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            for name, layer in mlp().named_children():  # the MLP's parameter names, as in x*
                self.add_module(name, layer)

        def forward(self, x):
            for layer in self.children():
                x = layer(x)
            return x

        def training_step(self, batch, i):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Stamps(pl.Callback):
        def __init__(self, timer):
            self.t, self.timer = [], timer

        def on_train_batch_end(self, *args):
            self.t.append(stamp(self.timer))

    X, Y = mlp_data(64 * (steps + WARMUP))
    cbs = [PathGeometryCallback(ref, every=every, final_rtol=None)] if every else []
    timer = HookTimer(cbs[0], ("on_fit_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")) if cbs else None
    stamps = Stamps(timer)
    trainer = pl.Trainer(
        max_steps=steps + WARMUP, logger=CSVLogger(tmp, name="lightning"), callbacks=cbs + [stamps],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, gradient_clip_val=1.0, log_every_n_steps=10,
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=64))
    return per_step(stamps.t)


def gpt2_config():
    import transformers

    return transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, vocab_size=2048, n_positions=64)


def hf_trainer(every, steps, ref, tmp):
    import transformers

    from pathgeom_fast.integrations.hf import PathGeometryCallback

    class Stamps(transformers.TrainerCallback):
        def __init__(self):
            self.t, self.timer = [], None

        def on_step_end(self, *args, **kwargs):
            self.t.append(stamp(self.timer))

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config())
    ids = torch.randint(0, 2048, (8 * (steps + WARMUP), 32), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=steps + WARMUP, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        max_grad_norm=1.0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in ids])
    stamps = Stamps()
    if every:
        cb = PathGeometryCallback.attach(trainer, reference=ref, every=every, final_rtol=None)
        # its entry points: the measurement (from the clipping wrapper), the update, the log call
        stamps.timer = HookTimer(cb, ("_measure", "on_optimizer_step", "on_step_end"))
    trainer.add_callback(stamps)  # after ours: its on_step_end time includes our logging
    trainer.train()
    return per_step(stamps.t)


# ------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after %d warm-up steps)" % WARMUP)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="plain,hf,lightning,accelerate")
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args()
    torch.set_num_threads(1)  # CPU time of one thread: robust to the other jobs of a shared machine
    tmp = tempfile.mkdtemp()
    n_mlp = sum(q.numel() for q in mlp().parameters())
    configs = {}
    mlp_ref = reference_for(mlp(), tmp, "mlp")
    only = a.only.split(",")
    if "plain" in only:
        for opt in ("momentum", "adamw"):
            configs[f"plain loop, MLP {n_mlp / 1e6:.1f}M, {'SGD momentum' if opt == 'momentum' else 'AdamW'}"] = (
                lambda e, opt=opt: plain(e, a.steps, mlp_ref, opt)
            )
    if "hf" in only:
        import transformers

        m = transformers.GPT2LMHeadModel(gpt2_config())
        n = sum(q.numel() for q in m.parameters())
        gpt_ref = reference_for(m, tmp, "gpt2")
        configs[f"HF Trainer, GPT-2 {n / 1e6:.1f}M, AdamW, accum 2"] = lambda e: hf_trainer(e, a.steps, gpt_ref, tmp)
    if "lightning" in only:
        configs[f"Lightning, MLP {n_mlp / 1e6:.1f}M, SGD momentum"] = lambda e: lightning_fit(e, a.steps, mlp_ref, tmp)
    if "accelerate" in only:
        configs[f"Accelerate loop, MLP {n_mlp / 1e6:.1f}M, AdamW, accum 2"] = lambda e: accelerate_loop(e, a.steps, mlp_ref)
    best: dict[tuple[str, object], tuple[float, float, float]] = {}
    for _ in range(a.repeats):
        for name, fn in configs.items():
            for every in EVERY:  # side by side: base, every=1, every=10, then again
                cpu, wall, hooks = fn(every)
                if cpu < best.get((name, every), (float("inf"),))[0]:
                    best[(name, every)] = (cpu, wall, hooks)
                print(
                    f"  {name}, every={every}: {cpu * 1e3:.1f} ms CPU ({hooks * 1e3:.1f} in pathgeom), "
                    f"{wall * 1e3:.1f} ms wall per step",
                    file=sys.stderr,
                )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    head = (
        f"{'integration, model':<44}{'base':>7}{'every=1':>9}{'(e2e)':>8}{'in pg':>7}{'(%)':>7}"
        f"{'every=10':>10}{'(e2e)':>8}{'in pg':>7}{'(%)':>7}"
    )
    lines = [
        f"pathgeom_fast overhead per optimizer step, CPU ({platform.processor() or platform.machine()}, "
        f"torch on 1 thread), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
        f"command: python bench/overhead.py --steps {a.steps} --repeats {a.repeats}; load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}",
        "ms of CPU time per optimizer step, fastest of the repeats; (e2e): the step time against the base;",
        "in pg: CPU time inside the integration's own hooks in that run, (%): of the base step time",
        head,
        "-" * len(head),
    ]
    for name in configs:
        (base, _, _), (e1, _, h1), (e10, _, h10) = (best[(name, e)] for e in EVERY)
        lines.append(
            f"{name:<44}{base * 1e3:>7.1f}{e1 * 1e3:>9.1f}{(e1 / base - 1) * 100:>+7.0f}%{h1 * 1e3:>7.1f}{h1 / base * 100:>6.1f}%"
            f"{e10 * 1e3:>10.1f}{(e10 / base - 1) * 100:>+7.0f}%{h10 * 1e3:>7.1f}{h10 / base * 100:>6.1f}%"
        )
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
