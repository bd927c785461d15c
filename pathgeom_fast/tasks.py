"""The demo's workloads (``pathgeom demo --task NAME``): models, data and their default settings.

Every task's data is a pair of tensors ``(inputs, targets)`` with one example per row, so
that batches are ``(inputs[idx], targets[idx])`` and one loss serves all tasks
(:func:`loss_fn`: cross-entropy of the logits, over every position for the language model).
Nothing is downloaded: the digits ship inside scikit-learn, the text inside CPython.

======== =============================================================================== =============
task     model and data                                                                   parameters
======== =============================================================================== =============
mlp      MLP 64-128-128-10 (ReLU) on scikit-learn's digits (1797 images of 8x8)           26,122
cnn      2 conv layers (16, 32 channels) with BatchNorm, average pool, linear; digits     10,026
wide-mlp the paper's "4x4096" MLP: 4 hidden layers of 4096 (ReLU), 64-4096x4-10; digits    50,651,146
lm       GPT-style decoder (2 pre-LayerNorm blocks, d=128, 4 heads, context 64), bytes   470,528
         of CPython's documentation topics (``pydoc_data.topics``), 512 windows of 65
======== =============================================================================== =============

The paper's MLP (about 46M parameters) took CIFAR-10's 3072 inputs; on the digits' 64
inputs, four hidden layers of 4096 give 50.65M parameters (three would give 33.8M), so
``wide-mlp`` keeps the paper's "4x4096" shape rather than its exact count.

Entry points for ``pathgeom analyze`` (no arguments, the tasks' default sizes):
``pathgeom_fast.tasks:mlp_model``, ``cnn_model``, ``wide_mlp_model``, ``lm_model``,
``digits_data``, ``lm_data``, and ``--loss pathgeom_fast.tasks:loss_fn`` for the language model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

TASKS = ("mlp", "cnn", "wide-mlp", "lm")


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def digits_data(device: str = "cpu", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: (X float32 [n, 64] standardised, y int64 [n]); all 1797 by default."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.int64)
    if n is not None:
        if not 1 <= n <= len(X):
            raise ValueError(f"--train-size for the digits must be between 1 and {len(X)}, got {n}")
        X, y = X[:n], y[:n]
    return X.to(device), y.to(device)


def corpus_bytes() -> torch.Tensor:
    """CPython's documentation topics (``pydoc_data.topics``, about 465k characters) as UTF-8
    bytes (uint8), topics in sorted order separated by blank lines. The text differs a little
    between Python versions."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def lm_data(device: str = "cpu", n: int = 512, context: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level language modelling: ``n`` windows of ``context + 1`` bytes, evenly spread over
    the corpus; inputs [n, context] and next-byte targets [n, context] (int64)."""
    data = corpus_bytes().to(torch.int64)
    available = (len(data) - 1) // context
    if not 1 <= n <= available:
        raise ValueError(f"--train-size for the lm task must be between 1 and {available} windows of {context} bytes, got {n}")
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    starts = torch.linspace(0, (available - 1) * context, n).round().to(torch.int64)
    windows = data[starts[:, None] + torch.arange(context + 1)]
    return windows[:, :-1].contiguous().to(device), windows[:, 1:].contiguous().to(device)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def mlp(width: int = 128, depth: int = 2, inputs: int = 64, classes: int = 10) -> torch.nn.Sequential:
    """``depth`` hidden layers of ``width`` units with ReLU."""
    if width < 1 or depth < 1:
        raise ValueError(f"the MLP needs --width >= 1 and --depth >= 1, got {width} and {depth}")
    layers: list[torch.nn.Module] = []
    fan_in = inputs
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.ReLU()]
        fan_in = width
    layers.append(torch.nn.Linear(fan_in, classes))
    return torch.nn.Sequential(*layers)


class SmallCNN(torch.nn.Module):
    """Conv(1->w) BN ReLU, Conv(w->2w) BN ReLU, average pool 2, Linear(2w*16 -> 10) on 8x8 digits.
    BatchNorm's running statistics are buffers: the tracker's probes restore them."""

    def __init__(self, width: int = 16):
        super().__init__()
        if width < 1:
            raise ValueError(f"the CNN needs --width >= 1, got {width}")
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(2 * width)
        self.fc = torch.nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class _Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.ln2 = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, 4 * width)
        self.out = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    """A GPT-style decoder in plain torch: token and learned position embeddings, ``depth``
    pre-LayerNorm blocks, a final LayerNorm and an untied linear head to ``vocab`` logits.
    No dropout (the replay must be exact). ``forward(idx [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int = 256, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        if width < 1 or depth < 1 or heads < 1 or width % heads:
            raise ValueError(f"the lm needs --width divisible by {heads} heads and --depth >= 1, got width {width}, depth {depth}")
        self.context = context
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        for m in self.modules():  # GPT-2's initialisation scale
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
        for b in self.blocks:  # residual projections scaled by depth, as GPT-2
            torch.nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * depth))
            torch.nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"TinyGPT: sequence of {T} tokens is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` against ``targets``; logits [..., classes] and
    targets [...] (one class per example, or one next token per position)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ------------------------------------------------------------------------------------------
# The presets
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A demo workload: how to build its model and data, and its default run settings.

    ``sizes`` holds the defaults of the size options (width, depth, context, train_size);
    ``defaults`` those of :class:`pathgeom_fast.demo.DemoConfig` fields the task overrides."""

    name: str
    summary: str
    build: Callable[[dict], torch.nn.Module]
    load: Callable[[dict, str], tuple[torch.Tensor, torch.Tensor]]
    sizes: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    full_chunk: int = 4096  # examples per chunk of the full-batch gradient

    def model(self, sizes: dict | None = None) -> torch.nn.Module:
        return self.build({**self.sizes, **{k: v for k, v in (sizes or {}).items() if v is not None}})

    def data(self, sizes: dict | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.load({**self.sizes, **{k: v for k, v in (sizes or {}).items() if v is not None}}, device)

    def describe(self, sizes: dict | None = None) -> str:
        s = {**self.sizes, **{k: v for k, v in (sizes or {}).items() if v is not None}}
        if self.name == "lm":
            return f"byte-level GPT d={s['width']} x{s['depth']} blocks, context {s['context']}, {s['train_size']} windows of CPython docs"
        if self.name == "cnn":
            return f"CNN {s['width']}/{2 * s['width']} channels + BatchNorm on digits"
        return f"MLP {s['depth']}x{s['width']} on digits"


def _digits(s: dict, device: str):
    return digits_data(device, s.get("train_size"))


TASK_SPECS: dict[str, Task] = {
    "mlp": Task(
        "mlp", "MLP 64-128-128-10 on digits (26k parameters; seconds)",
        build=lambda s: mlp(s["width"], s["depth"]), load=_digits,
        sizes={"width": 128, "depth": 2, "train_size": None},
        defaults={"steps": 400, "optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "probe_batches": 8,
                  "probe_every": 10, "snapshot_every": 50, "lag_every": 10, "cross_seed": True},
    ),
    "cnn": Task(
        "cnn", "small CNN with BatchNorm on digits (10k parameters)",
        build=lambda s: SmallCNN(s["width"]), load=_digits,
        sizes={"width": 16, "train_size": None},
        defaults={"steps": 400, "optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "probe_batches": 8,
                  "probe_every": 10, "snapshot_every": 50, "lag_every": 10, "cross_seed": True},
    ),
    "wide-mlp": Task(
        "wide-mlp", "the paper's 4x4096 MLP on digits (50.65M parameters; minutes)",
        build=lambda s: mlp(s["width"], s["depth"]), load=_digits,
        sizes={"width": 4096, "depth": 4, "train_size": None},
        defaults={"steps": 100, "optimizer": "momentum", "lr": 0.02, "schedule": "cosine", "probe_batches": 4,
                  "probe_every": 10, "snapshot_every": 0, "lag_every": 10, "cross_seed": False, "x0_reference": False},
    ),
    "lm": Task(
        "lm", "GPT-style byte-level LM on CPython's docs, Adam (coupled L2) + clipping 0.25 (0.47M parameters)",
        build=lambda s: TinyGPT(256, s["width"], s["depth"], 4, s["context"]),
        load=lambda s, device: lm_data(device, s["train_size"], s["context"]),
        sizes={"width": 128, "depth": 2, "context": 64, "train_size": 512},
        defaults={"steps": 300, "batch_size": 16, "optimizer": "adam-l2", "lr": 3e-3, "schedule": "warmup-cosine",
                  "weight_decay": 1e-5, "clip_grad_norm": 0.25, "probe_batches": 4, "probe_every": 25, "snapshot_every": 100,
                  "lag_every": 10, "cross_seed": True},
        full_chunk=256,
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ValueError(f"--task must be one of {TASKS}, got {name!r}") from None


# Zero-argument entry points for `pathgeom analyze --model ... --data ...` (default sizes).
def mlp_model() -> torch.nn.Module:
    return TASK_SPECS["mlp"].model()


def cnn_model() -> torch.nn.Module:
    return TASK_SPECS["cnn"].model()


def wide_mlp_model() -> torch.nn.Module:
    return TASK_SPECS["wide-mlp"].model()


def lm_model() -> torch.nn.Module:
    return TASK_SPECS["lm"].model()
