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
resnet   residual CNN: stem conv 8 + BN, a residual block of 8 channels, a stride-2 block   5,122
         to 16 channels (1x1 projection shortcut), global average pool, linear; digits
wide-mlp the paper's "4x4096" MLP: 4 hidden layers of 4096 (ReLU), 64-4096x4-10; digits    50,651,146
lm       GPT-style decoder (2 pre-LayerNorm blocks, d=128, 4 heads, context 64), bytes   470,528
         of CPython's documentation topics (``pydoc_data.topics``), 512 windows of 65
======== =============================================================================== =============

Ablations (the paper's, as switches of :meth:`Task.model`, ``pathgeom demo`` flags):
``batchnorm=False`` (``--no-batchnorm``, cnn and resnet) replaces every BatchNorm layer by
the identity, nothing else changed, so D drops by exactly the BatchNorm affine parameters;
``skip=False`` (``--no-skip``, resnet) drops the residual connections (and the projection
shortcut, which only served them); ``init_scale=S`` (``--init-scale``, every task) multiplies
every parameter tensor of the default initialisation by S, so x_0 becomes S x_0 (same seed,
same random draws). A switch that does not apply to a task is refused (ValueError).

The paper's MLP (about 46M parameters) took CIFAR-10's 3072 inputs; on the digits' 64
inputs, four hidden layers of 4096 give 50.65M parameters (three would give 33.8M), so
``wide-mlp`` keeps the paper's "4x4096" shape rather than its exact count.

Entry points for ``pathgeom analyze`` (no arguments, the tasks' default sizes):
``pathgeom_fast.tasks:mlp_model``, ``cnn_model``, ``resnet_model``, ``wide_mlp_model``, ``lm_model``,
``digits_data``, ``lm_data``, and ``--loss pathgeom_fast.tasks:loss_fn`` for the language model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

TASKS = ("mlp", "cnn", "resnet", "wide-mlp", "lm")
#: the ablation switches of Task.model and their defaults (the unablated model)
ABLATIONS = {"batchnorm": True, "skip": True, "init_scale": 1.0}
_FLAGS = {"batchnorm": "--no-batchnorm", "skip": "--no-skip", "init_scale": "--init-scale"}


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


def _norm(channels: int, batchnorm: bool) -> torch.nn.Module:
    """BatchNorm2d, or the identity for the no-BatchNorm ablation (no parameters, no buffers)."""
    return torch.nn.BatchNorm2d(channels) if batchnorm else torch.nn.Identity()


class SmallCNN(torch.nn.Module):
    """Conv(1->w) BN ReLU, Conv(w->2w) BN ReLU, average pool 2, Linear(2w*16 -> 10) on 8x8 digits.
    BatchNorm's running statistics are buffers: the tracker's probes restore them. With
    ``batchnorm=False`` both BatchNorm layers are the identity (the convolutions keep their biases)."""

    def __init__(self, width: int = 16, batchnorm: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"the CNN needs --width >= 1, got {width}")
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = _norm(width, batchnorm)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = _norm(2 * width, batchnorm)
        self.fc = torch.nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class _ResBlock(torch.nn.Module):
    """conv3x3 BN ReLU conv3x3 BN, plus the shortcut (identity, or a 1x1 strided projection when
    the shape changes), then ReLU. Convolutions without bias, as in ResNets. ``skip=False``: no
    shortcut (and no projection)."""

    def __init__(self, cin: int, cout: int, stride: int, batchnorm: bool, skip: bool):
        super().__init__()
        self.skip = skip
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(cout, batchnorm)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(cout, batchnorm)
        self.proj = None
        if skip and (stride != 1 or cin != cout):
            self.proj = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(cout, batchnorm))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.skip:
            out = out + (x if self.proj is None else self.proj(x))
        return F.relu(out)


class SmallResNet(torch.nn.Module):
    """A small residual CNN on 8x8 digits: stem conv3x3(1->w) BN ReLU; a residual block of w
    channels; a stride-2 residual block to 2w channels (1x1 projection shortcut); global average
    pool; Linear(2w -> 10). 5,122 parameters at w = 8 (``batchnorm=False``: 4,978; ``skip=False``:
    4,962)."""

    def __init__(self, width: int = 8, batchnorm: bool = True, skip: bool = True):
        super().__init__()
        if width < 1:
            raise ValueError(f"the resnet needs --width >= 1, got {width}")
        self.stem = torch.nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = _norm(width, batchnorm)
        self.block1 = _ResBlock(width, width, 1, batchnorm, skip)
        self.block2 = _ResBlock(width, 2 * width, 2, batchnorm, skip)
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x.view(-1, 1, 8, 8))))
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


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
    ``defaults`` those of :class:`pathgeom_fast.demo.DemoConfig` fields the task overrides;
    ``ablations`` the switches of :data:`ABLATIONS` besides ``init_scale`` that its model has."""

    name: str
    summary: str
    build: Callable[[dict], torch.nn.Module]
    load: Callable[[dict, str], tuple[torch.Tensor, torch.Tensor]]
    sizes: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    full_chunk: int = 4096  # examples per chunk of the full-batch gradient
    ablations: tuple = ()

    def _settings(self, sizes: dict | None) -> dict:
        return {**self.sizes, **ABLATIONS, **{k: v for k, v in (sizes or {}).items() if v is not None}}

    def check_ablations(self, settings: dict) -> None:
        """ValueError naming the flag when a switch is set that this task's model does not have."""
        scale = settings.get("init_scale", 1.0)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"--init-scale must be a finite number above 0, got {scale!r}")
        for key in ("batchnorm", "skip"):
            if settings.get(key, ABLATIONS[key]) != ABLATIONS[key] and key not in self.ablations:
                has = [t for t, spec in TASK_SPECS.items() if key in spec.ablations]
                what = "BatchNorm layers" if key == "batchnorm" else "skip connections"
                raise ValueError(f"{_FLAGS[key]} does not apply to the {self.name} task (its model has no {what}; "
                                 f"it applies to: {', '.join(has)})")

    def model(self, sizes: dict | None = None) -> torch.nn.Module:
        """The model at the given sizes and ablation switches; ``init_scale`` S multiplies every
        parameter of the default initialisation by S (the random draws are the same)."""
        s = self._settings(sizes)
        self.check_ablations(s)
        model = self.build(s)
        if s["init_scale"] != 1.0:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(s["init_scale"])
        return model

    def data(self, sizes: dict | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(self._settings(sizes), device)

    def describe(self, sizes: dict | None = None) -> str:
        s = self._settings(sizes)
        if self.name == "lm":
            text = f"byte-level GPT d={s['width']} x{s['depth']} blocks, context {s['context']}, {s['train_size']} windows of CPython docs"
        elif self.name == "cnn":
            text = f"CNN {s['width']}/{2 * s['width']} channels " + ("+ BatchNorm" if s["batchnorm"] else "without BatchNorm") + " on digits"
        elif self.name == "resnet":
            text = (f"ResNet {s['width']}/{2 * s['width']} channels, " + ("BatchNorm" if s["batchnorm"] else "no BatchNorm")
                    + (", skip connections" if s["skip"] else ", no skip connections") + " on digits")
        else:
            text = f"MLP {s['depth']}x{s['width']} on digits"
        return text + (f", init x{s['init_scale']:g}" if s["init_scale"] != 1.0 else "")


def _digits(s: dict, device: str):
    return digits_data(device, s.get("train_size"))


_DIGITS_DEFAULTS = {"steps": 400, "optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "probe_batches": 8,
                    "probe_every": 10, "snapshot_every": 50, "lag_every": 10, "cross_seed": True}

TASK_SPECS: dict[str, Task] = {
    "mlp": Task(
        "mlp", "MLP 64-128-128-10 on digits (26k parameters; seconds)",
        build=lambda s: mlp(s["width"], s["depth"]), load=_digits,
        sizes={"width": 128, "depth": 2, "train_size": None},
        defaults=dict(_DIGITS_DEFAULTS),
    ),
    "cnn": Task(
        "cnn", "small CNN with BatchNorm on digits (10k parameters)",
        build=lambda s: SmallCNN(s["width"], s["batchnorm"]), load=_digits,
        sizes={"width": 16, "train_size": None},
        defaults=dict(_DIGITS_DEFAULTS),
        ablations=("batchnorm",),
    ),
    "resnet": Task(
        "resnet", "small residual CNN with BatchNorm on digits (5k parameters; --no-skip, --no-batchnorm)",
        build=lambda s: SmallResNet(s["width"], s["batchnorm"], s["skip"]), load=_digits,
        sizes={"width": 8, "train_size": None},
        defaults=dict(_DIGITS_DEFAULTS),
        ablations=("batchnorm", "skip"),
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


def resnet_model() -> torch.nn.Module:
    return TASK_SPECS["resnet"].model()


def wide_mlp_model() -> torch.nn.Module:
    return TASK_SPECS["wide-mlp"].model()


def lm_model() -> torch.nn.Module:
    return TASK_SPECS["lm"].model()
