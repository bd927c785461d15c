"""Measure the geometry inside a Hugging Face Trainer run (python examples/hf_trainer.py).

A 2-layer GPT-2 built locally (nothing downloaded), random tokens, gradient accumulation
and clipping; run 1 gives x*, run 2 measures with one line: PathGeometryCallback.attach.
"""

import os
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from pathgeom_fast.integrations.hf import PathGeometryCallback
from pathgeom_fast.snapshots import save_snapshot

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
out = tempfile.mkdtemp()
ids = torch.randint(0, 128, (256, 32), generator=torch.Generator().manual_seed(0))
train_set = [{"input_ids": t, "labels": t} for t in ids]
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=steps,
    max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
)


def make_trainer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32))
    return Trainer(model=model, args=args, train_dataset=train_set)


run1 = make_trainer()
run1.train()
xstar = os.path.join(out, "xstar.safetensors")
save_snapshot(run1.model, xstar, steps)

trainer = make_trainer()
PathGeometryCallback.attach(trainer, reference=xstar, every=1)  # the one line
trainer.train()
for entry in trainer.state.log_history:
    if "pathgeom/rsi" in entry:
        print(entry["step"], {k: round(v, 4) for k, v in entry.items() if k.startswith("pathgeom/")})
