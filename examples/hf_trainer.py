"""Measure the geometry inside a Hugging Face Trainer run (python examples/hf_trainer.py).

A 2-layer GPT-2 built locally (nothing downloaded), random tokens, gradient accumulation,
clipping and logging every 5 steps. Run 1 records x* with one line, run 2 measures against
it with one line (probes and the full batch every 5 steps); the Trainer's own logs are intact.
"""

import os
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from pathgeom_fast.integrations.hf import PathGeometryCallback

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
out = tempfile.mkdtemp()
ids = torch.randint(0, 128, (256, 32), generator=torch.Generator().manual_seed(0))
train_set = [{"input_ids": t, "labels": t} for t in ids]
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=steps,
    max_grad_norm=1.0, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
)


def make_trainer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32))
    return Trainer(model=model, args=args, train_dataset=train_set)


xstar = os.path.join(out, "xstar.safetensors")
run1 = make_trainer()
PathGeometryCallback.record_reference(run1, xstar)  # run 1: writes x* and its loss trajectory at the end
run1.train()

trainer = make_trainer()
PathGeometryCallback.attach(  # run 2: the one line
    trainer, reference=xstar, every=1,
    probe_batches=[train_set[i : i + 8] for i in (0, 64, 128)], full_batch=[train_set[i : i + 64] for i in range(0, 256, 64)],
    probe_every=5,
)
trainer.train()
for entry in trainer.state.log_history:
    if any(k.startswith("pathgeom/") for k in entry):
        print(entry["step"], {k: round(v, 4) for k, v in entry.items() if k.startswith("pathgeom/")})
    elif "loss" in entry:
        print(entry["step"], "Trainer's own log:", {k: entry[k] for k in ("loss", "grad_norm", "learning_rate")})
