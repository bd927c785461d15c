"""Runs of the real libraries that write checkpoints (a Hugging Face Trainer with save_steps, a
Lightning Trainer with ModelCheckpoint), made once per test session and shared by
tests/checkpoints/test_checkpoints.py and tests/cli/test_analyze.py. Small models, a few steps."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from types import SimpleNamespace

import torch

# The data of the HF run, also written to a user module (mydata.py) by the analyze test.
HF_DATA_SOURCE = '''
import torch

def train_set():
    """48 token sequences as a Trainer takes them: a list of {"input_ids", "labels"} samples."""
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (48, 16), generator=gen)]
'''


def hf_train_set():
    ns: dict = {}
    exec(HF_DATA_SOURCE, ns)
    return ns["train_set"]()


def file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file under folder (to check that reading changes nothing)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _tmpdir(prefix: str) -> str:
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def hf_trainer_run() -> SimpleNamespace:
    """Tiny GPT-2 (dropout 0.1 as configured by default), 6 AdamW steps with a linear schedule,
    checkpoint-2/4/6 saved by the Trainer (save_steps=2), logged every step."""
    import transformers

    out = os.path.join(_tmpdir("pg-hf-"), "hf_out")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3, lr_scheduler_type="linear",
        logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=hf_train_set())
    trainer.train()
    return SimpleNamespace(
        out=out,
        log_history=list(trainer.state.log_history),
        final_lr=float(trainer.lr_scheduler.get_last_lr()[0]),
        hashes=file_hashes(out),
    )


def lightning_net() -> torch.nn.Module:
    """The network inside the Lightning module (attribute ``net``), with BatchNorm and Dropout."""
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )


def lightning_data():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(64, 6, generator=gen) * 3, torch.randint(0, 3, (64,), generator=gen)


@functools.lru_cache(maxsize=None)
def lightning_run() -> SimpleNamespace:
    """A LightningModule holding ``net``, SGD with momentum and a StepLR(2, 0.5) stepped every
    optimizer step; ModelCheckpoint every 2 steps (all kept) and last.ckpt."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = lightning_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    out = os.path.join(_tmpdir("pg-pl-"), "checkpoints")
    torch.manual_seed(0)
    X, Y = lightning_data()
    ck = ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(
        max_steps=6, callbacks=[ck], logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
    return SimpleNamespace(out=out, hashes=file_hashes(out))


@functools.lru_cache(maxsize=None)
def fsdp2_dcp_run() -> SimpleNamespace:
    """2 gloo processes train checkpoint_workers.mlp sharded with FSDP2 and save DCP checkpoints
    step_0/2/4/6 (see checkpoint_workers.fsdp2_dcp_run, which also checks the sharded reads);
    ``saved``: {step: {name: full tensor}} as rank 0 saw them when saving."""
    import checkpoint_workers as C
    import dist_workers as W

    base = _tmpdir("pg-dcp-")
    out = os.path.join(base, "ck")
    os.makedirs(out)
    W.launch(C.fsdp2_dcp_run, 2, out)
    return SimpleNamespace(out=out, saved=torch.load(os.path.join(base, "saved_full.pt"), weights_only=True), hashes=file_hashes(out))
