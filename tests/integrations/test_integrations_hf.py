"""The Hugging Face integration with the real transformers.Trainer (and its TensorBoard logging).

Every logged value is compared with an fp64 recomputation from parameters and gradients captured
independently of the callback with torch's public hooks (the accumulated gradient as autograd
left it, at the start of each optimizer step: before any clipping, however the Trainer clips), and
the Trainer's own log entries are compared with those of the same run without the callback.
"""

import argparse
import glob
import json
import math
import os

import pytest
import torch
from integ_helpers import PreClipCapture, Warnings, assert_metrics, flat, geo, grad_of, perturbed_reference, probe_summary

transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install --no-build-isolation '.[hf]'")

from pathgeom_fast import report  # noqa: E402
from pathgeom_fast.checkpoints import CheckpointError, load_snapshot  # noqa: E402
from pathgeom_fast.integrations.common import trajectory_path  # noqa: E402
from pathgeom_fast.integrations.hf import PathGeometryCallback  # noqa: E402
from pathgeom_fast.snapshots import list_snapshots, save_snapshot  # noqa: E402

TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
CFG = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
IDS = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(1))
DATA = [{"input_ids": t, "labels": t} for t in IDS]


def make_trainer(out, lr=1e-3, report_to=(), steps=10, **kw):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=lr, max_grad_norm=0.5, logging_steps=5, report_to=list(report_to), save_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=DATA)


def own_entries(trainer):
    """The Trainer's own log entries (timings left out: they are wall-clock)."""
    return [
        {k: v for k, v in h.items() if k not in TIMING}
        for h in trainer.state.log_history
        if not any(k.startswith("pathgeom/") for k in h)
    ]


def pathgeom_entries(trainer):
    return [h for h in trainer.state.log_history if "pathgeom/rsi" in h]


def tensorboard_scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(out), "runs", "*"))
    assert len(files) == 1, files
    acc = EventAccumulator(files[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_trainer_logs_intact_and_pathgeom_logged_every_measured_step(tmp_path):
    pytest.importorskip("tensorboard")
    ref = tmp_path / "xstar.safetensors"
    xstar = perturbed_reference(transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG)), ref)
    probe_examples = [DATA[40:42], DATA[50:53]]  # lists of examples: collated by the trainer's collator
    full_examples = [DATA[i : i + 16] for i in range(0, 64, 16)]  # equal sizes: the mean of their gradients

    def probes_and_full(params):  # at x_t, with the loss the Trainer uses; .grad left alone
        m = every1.model
        coll = transformers.default_data_collator
        probes = [grad_of(m, m(**coll(b)).loss) for b in probe_examples]
        full = sum(grad_of(m, m(**coll(b)).loss) for b in full_examples) / len(full_examples)
        return probes, full

    base = make_trainer(tmp_path / "base", report_to=["tensorboard"])
    base.train()
    every1 = make_trainer(tmp_path / "every1", report_to=["tensorboard"])
    PathGeometryCallback.attach(
        every1, reference=str(ref), every=1, probe_batches=probe_examples, full_batch=full_examples, probe_every=3,
        per_tensor=True, final_rtol=None,
    )
    with PreClipCapture(every1.model, probes_and_full) as capture:  # (x_t, g_t, probe gradients, full gradient)
        every1.train()
    captured = capture.captured
    every2 = make_trainer(tmp_path / "every2")
    PathGeometryCallback.attach(every2, reference=str(ref), every=2, final_rtol=None)
    every2.train()

    # 1. the Trainer's own entries: exactly those of the run without the callback
    want = own_entries(base)
    assert [h["step"] for h in want if "loss" in h] == [5, 10] and "grad_norm" in want[0] and "learning_rate" in want[0]
    assert own_entries(every1) == want
    assert own_entries(every2) == want

    # 2. pathgeom scalars on every measured step (Trainer step = t + 1), against fp64
    assert [h["step"] for h in pathgeom_entries(every1)] == list(range(1, 11))
    assert [h["step"] for h in pathgeom_entries(every2)] == [1, 3, 5, 7, 9]
    assert len(captured) == 10
    names = [n for n, _ in every1.model.named_parameters()]
    sizes = [p.numel() for p in every1.model.parameters()]
    final = flat(every1.model.parameters())
    n_logged = 0
    for t, (h, (x, g, probes, full)) in enumerate(zip(pathgeom_entries(every1), captured)):
        assert math.sqrt(float(g @ g)) > 0.5  # clipping was active: a post-clip measurement would differ
        logged = [e["grad_norm"] for e in own_entries(every1) if e.get("step") == t + 1 and "grad_norm" in e]
        n_logged += len(logged)
        for norm in logged:  # the Trainer's own pre-clip norm (logged at steps 5 and 10) is the g measured
            assert math.sqrt(float(g @ g)) == pytest.approx(norm, rel=1e-5), f"step {t}"
            assert h["pathgeom/eb"] * math.sqrt(float((x - xstar) @ (x - xstar))) == pytest.approx(norm, rel=1e-5)
        assert_metrics(h, "pathgeom/", geo(g, x, xstar), f"step {t}")
        x_next = captured[t + 1][0] if t + 1 < len(captured) else final
        assert_metrics(h, "pathgeom/update_", geo(x - x_next, x, xstar), f"step {t}", rel=1e-4)  # the update AdamW took
        if t % 3 == 0:
            assert_metrics(h, "pathgeom/probe_", probe_summary(probes, x, xstar), f"step {t}")
            assert_metrics(h, "pathgeom/full_", geo(full, x, xstar), f"step {t}")
        else:
            assert "pathgeom/probe_rsi" not in h and "pathgeom/full_rsi" not in h
        i = names.index("transformer.h.0.attn.c_attn.weight")
        sl = slice(sum(sizes[:i]), sum(sizes[: i + 1]))
        assert_metrics(h, "pathgeom/tensor/transformer.h.0.attn.c_attn.weight/", geo(g[sl], x[sl], xstar[sl]), f"step {t}")
    assert n_logged == 2  # grad_norm logged at steps 5 and 10, both compared
    assert sum(k.startswith("pathgeom/tensor/") for k in pathgeom_entries(every1)[0]) == 4 * len(names)
    for h in pathgeom_entries(every2):
        same = next(e for e in pathgeom_entries(every1) if e["step"] == h["step"])  # the same path, measured alike
        assert h["pathgeom/rsi"] == pytest.approx(same["pathgeom/rsi"], rel=1e-12)  # (per_tensor sums rows)

    # 3. TensorBoard: the Trainer's own scalars unchanged, pathgeom scalars at every measured step
    tb_base, tb = tensorboard_scalars(tmp_path / "base"), tensorboard_scalars(tmp_path / "every1")
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate"):
        assert tb[tag] == tb_base[tag] and [s for s, _ in tb[tag]] == [5, 10], tag
    assert [s for s, _ in tb["train/pathgeom/rsi"]] == list(range(1, 11))
    for (s, v), h in zip(tb["train/pathgeom/rsi"], pathgeom_entries(every1)):
        assert v == pytest.approx(h["pathgeom/rsi"], rel=1e-6)  # TensorBoard stores float32
    assert [s for s, _ in tb["train/pathgeom/probe_cos_min"]] == [1, 4, 7, 10]
    assert [s for s, _ in tb["train/pathgeom/final_distance_ratio"]] == [10]


class ScaledLossTrainer(transformers.Trainer):
    """A custom compute_loss, as users write them: 3 x the shifted cross-entropy + a logit penalty."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits
        return custom_loss(logits, inputs["labels"])


def custom_loss(logits, labels):
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    return 3.0 * ce + 0.01 * logits.pow(2).mean()


def smoothed_loss(logits, labels, eps=0.2):
    # what the Trainer's LabelSmoother computes for a causal LM (labels shifted, mean over tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=eps)


@pytest.mark.parametrize("case", ["subclass", "label_smoothing"])
def test_probes_use_the_trainers_own_loss(tmp_path, case):
    """The probes' default loss is the Trainer's compute_loss: a subclass's override, and label
    smoothing (whose compute_loss pops the labels from the batch it gets: the stored probe
    batches keep theirs, measured at four steps). Each probe gradient is recomputed at the start of
    each optimizer step with the loss written out by hand; the model's own .loss gives another."""
    ref = tmp_path / "xstar.safetensors"
    xstar = perturbed_reference(transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG)), ref)
    probe_examples = [DATA[40:42], DATA[50:53]]
    loss_of = custom_loss if case == "subclass" else smoothed_loss

    def probes_both_ways(params):  # at x_t: the loss written out by hand, and the model's own .loss
        coll = transformers.default_data_collator
        probes, plain = [], []
        for b in probe_examples:
            batch = coll(b)
            probes.append(grad_of(trainer.model, loss_of(trainer.model(input_ids=batch["input_ids"]).logits, batch["labels"])))
            plain.append(grad_of(trainer.model, trainer.model(**batch).loss))
        return probes, plain

    if case == "subclass":
        trainer = make_trainer(tmp_path / "run", steps=4)
        trainer = ScaledLossTrainer(model=trainer.model, args=trainer.args, train_dataset=DATA)
    else:
        trainer = make_trainer(tmp_path / "run", steps=4, label_smoothing_factor=0.2)
    PathGeometryCallback.attach(trainer, reference=str(ref), probe_batches=probe_examples, probe_every=1, final_rtol=None)
    with PreClipCapture(trainer.model, probes_both_ways) as capture:
        trainer.train()
    captured = [(x, probes, plain) for x, _, probes, plain in capture.captured]
    entries = pathgeom_entries(trainer)
    assert len(entries) == len(captured) == 4
    for t, (h, (x, probes, plain)) in enumerate(zip(entries, captured)):
        assert_metrics(h, "pathgeom/probe_", probe_summary(probes, x, xstar), f"step {t}")
        other = probe_summary(plain, x, xstar)
        assert abs(other["eb"] - h["pathgeom/probe_eb"]) > 1e-3 * abs(other["eb"]), "the model's .loss would pass too"


def test_two_run_protocol_with_the_trainer(tmp_path):
    ref = str(tmp_path / "run1" / "xstar.safetensors")
    run1 = make_trainer(tmp_path / "out1")
    cb1 = PathGeometryCallback.record_reference(run1, ref, snapshot_dir=str(tmp_path / "snaps"), snapshot_every=4)
    with Warnings() as w:
        run1.train()
    assert not w.matching("PathGeometryCallback") and cb1.final_distance_ratio is None
    state, meta = load_snapshot(ref)
    for n, p in run1.model.named_parameters():
        assert torch.equal(state[n], p.detach()), n
    assert meta["step"] == "10"
    assert [s for s, _ in list_snapshots(str(tmp_path / "snaps"))] == [0, 4, 8, 10]
    # the recorded loss of a step is what the Trainer averages into its logged `loss`
    traj = json.load(open(trajectory_path(ref)))
    losses = [traj["losses"][str(t)] for t in range(10)]
    logged = [h["loss"] for h in run1.state.log_history if "loss" in h]
    want = [sum(losses[:5]) / 5, sum(losses[5:]) / 5]
    assert len(logged) == 2
    for got, w in zip(logged, want):  # transformers before 4.52 logged the loss rounded to 4 decimals
        assert got == pytest.approx(w, rel=1e-6) or got == round(w, 4), (logged, want)

    run2 = make_trainer(tmp_path / "out2")
    cb2 = PathGeometryCallback.attach(run2, reference=ref, every=3)
    with Warnings() as w:
        run2.train()
    assert not w.matching("PathGeometryCallback"), w.matching("")
    assert cb2.final_distance_ratio == 0.0
    assert [(h["step"], h["pathgeom/final_distance_ratio"]) for h in run2.state.log_history if "pathgeom/final_distance_ratio" in h] == [(10, 0.0)]
    # the report of run 2: its rows, D, the replay's ratio; findings.md says the replay was exact
    rep = tmp_path / "report2"
    summary = cb2.write_report(str(rep), title="run 2")
    rows = report.read_csv(str(rep / "records.csv"))
    assert sorted({r["step"] for r in rows}) == [0, 3, 6, 9] and {r["kind"] for r in rows} >= {"minibatch", "update"}
    mine = {(r["step"], r["kind"]): r for r in rows}
    for h in (h for h in run2.state.log_history if "pathgeom/rsi" in h):
        assert mine[(h["step"] - 1, "minibatch")]["rsi"] == pytest.approx(h["pathgeom/rsi"], rel=1e-12)
    assert summary["numel"] == sum(p.numel() for p in run2.model.parameters()) and summary["replay_final_distance_ratio"] == 0.0
    assert json.loads((rep / "summary.json").read_text())["numel"] == summary["numel"]
    assert "replayed exactly in run 2" in (rep / "findings.md").read_text() and (rep / "geometry.png").is_file()

    other = make_trainer(tmp_path / "out3", lr=2e-3)  # another learning rate: not a replay
    cb3 = PathGeometryCallback.attach(other, reference=ref, every=3)
    with Warnings() as w:
        other.train()
    assert len(w.matching("drifts from run 1 at optimizer step 1:")) == 1, w.matching("")
    assert len(w.matching("||x_T - x*|| / ||x_0 - x*||")) == 1
    assert cb3.final_distance_ratio > 0.1


@pytest.mark.parametrize("case", ["ckpt", "missing", "int64"])
def test_bad_reference_fails_at_attach(tmp_path, case):
    trainer = make_trainer(tmp_path / "out")
    path = tmp_path / "ref.safetensors"
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if case == "ckpt":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)  # needs pickled code
        exc, match = CheckpointError, "cannot be read without running code stored in it"
    elif case == "missing":
        del state["transformer.wpe.weight"]
        save_snapshot_dict(path, state)
        exc, match = KeyError, "first 'transformer.wpe.weight'"
    else:
        state["transformer.ln_f.bias"] = torch.zeros(16, dtype=torch.int64)
        save_snapshot_dict(path, state)
        exc, match = CheckpointError, "'transformer.ln_f.bias' has dtype torch.int64"
    with pytest.raises(exc, match=match) as info:
        PathGeometryCallback.attach(trainer, reference=str(path))
    assert str(path) in str(info.value)
    assert trainer.state.global_step == 0 and not any(isinstance(c, PathGeometryCallback) for c in trainer.callback_handler.callbacks)


def save_snapshot_dict(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_hf_callback_needs_attach(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = str(tmp_path / "x.safetensors")
    save_snapshot(model, path, 0)
    cb = PathGeometryCallback(path)
    with pytest.raises(RuntimeError, match=r"PathGeometryCallback.attach\(trainer"):
        cb.on_train_begin(None, None, None)
