"""Measure the geometry inside a Lightning run (python examples/lightning_fit.py)."""

import os
import sys
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from pathgeom_fast.demo import make_data
from pathgeom_fast.integrations.lightning import PathGeometryCallback
from pathgeom_fast.snapshots import save_snapshot

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
X, Y = make_data()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Print(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("pathgeom/")}
        if m and trainer.global_step % 10 == 0:
            print(trainer.global_step, m)


def fit(callbacks):
    torch.manual_seed(0)
    model = Net()
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         gradient_clip_val=1.0)
    trainer.fit(model, loader)
    return model


xstar = os.path.join(tempfile.mkdtemp(), "xstar.safetensors")
save_snapshot(fit([]), xstar, steps)  # run 1: x*
fit([PathGeometryCallback(xstar, every=1), Print()])  # run 2: measured
