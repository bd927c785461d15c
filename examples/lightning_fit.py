"""Measure the geometry inside a Lightning run (python examples/lightning_fit.py).

Run 1 records x* (one callback), run 2 measures against it (one callback); the scalars go to
the trainer's logger (here a CSVLogger), every measured step under its own step.
"""

import csv
import glob
import os
import sys
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from pathgeom_fast.demo import make_data
from pathgeom_fast.integrations.lightning import PathGeometryCallback

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
X, Y = make_data()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)
out = tempfile.mkdtemp()


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(callback, logger=False):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         gradient_clip_val=1.0, log_every_n_steps=10)
    trainer.fit(Net(), loader)
    return callback


xstar = os.path.join(out, "xstar.safetensors")
fit(PathGeometryCallback.record_reference(xstar))  # run 1: x* and its loss trajectory
cb = fit(PathGeometryCallback(xstar, every=1, probe_batches=[(X[:64], Y[:64])], probe_every=10),
         logger=CSVLogger(out, name="run2"))  # run 2: measured
rows = list(csv.DictReader(open(glob.glob(os.path.join(out, "run2", "*", "metrics.csv"))[0])))
for row in rows:
    if row.get("pathgeom/rsi") and int(row["step"]) % 10 == 0:
        print(row["step"], {k: round(float(v), 4) for k, v in row.items() if k.startswith("pathgeom/") and v})
print("final distance ratio ||x_T - x*|| / ||x_0 - x*|| =", cb.final_distance_ratio)
