"""`pathgeom analyze` on runs written by the real libraries (Hugging Face Trainer, Lightning,
torch.save, torch.distributed.checkpoint from a 2-process FSDP2 run), every number compared
with an independent fp64 recomputation: the checkpoint loaded by the library's own loader
(or the tensors saved), the gradient from backward(), flattened and torch.cat in float64."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint_runs as R
from pathgeom_fast import cli, report
from pathgeom_fast.analyze import AnalysisError, analyze, batches_from_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def fp64_abc(model, batches, loss_fn, xstar, train=False, per_tensor=False):
    """(a, b, c) of the mean gradient over `batches` (weighted by size) at the model's current
    parameters against `xstar` (name -> tensor), in float64 from flattened copies."""
    from pathgeom_fast.batches import batch_size

    model.train(train)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    sizes = [batch_size(b) for b in batches]
    for b, n in zip(batches, sizes):
        (loss_fn(model, b) * (n / sum(sizes))).backward()
    if per_tensor:
        out = {}
        for n, p in named:
            g, d = p.grad.double().reshape(-1), (p.detach().double() - xstar[n].double()).reshape(-1)
            out[n] = ((g @ d).item(), (g @ g).item(), (d @ d).item())
        return out
    g = flat([p.grad for _, p in named])
    d = flat([p for _, p in named]) - flat([xstar[n] for n, _ in named])
    return (g @ d).item(), (g @ g).item(), (d @ d).item()


def check(row, abc, rel=1e-5, what=""):
    a, b, c = abc
    assert abs(row["a"] - a) <= rel * math.sqrt(b * c), (what, row, abc)
    assert row["b"] == pytest.approx(b, rel=rel), (what, row, abc)
    assert row["c"] == pytest.approx(c, rel=1e-6), (what, row, abc)
    assert row["cos"] == pytest.approx(a / math.sqrt(b * c), rel=rel, abs=rel), what
    assert row["rsi"] == pytest.approx(a / c, rel=rel, abs=rel * math.sqrt(b / c)), what


def probe_samples(data, n_probes, bs, seed=0):
    """The documented probe draw: a seeded randperm per probe batch."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(data), generator=gen)[:bs].tolist() for _ in range(n_probes)]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The current directory of a user, importable by --model/--data; sys.path restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in [m for m, mod in sys.modules.items() if getattr(mod, "__file__", None) and str(tmp_path) in str(mod.__file__)]:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer output_dir, no --model
# ------------------------------------------------------------------------------------------


def test_hf_trainer_output_dir_without_model(user_dir):
    transformers = pytest.importorskip("transformers")
    hf = R.hf_trainer_run()
    (user_dir / "mydata.py").write_text(R.HF_DATA_SOURCE)
    rc = cli.main(["analyze", hf.out, "--data", "mydata:train_set", "--out", "an", "--probe-batches", "3",
                   "--batch-size", "8", "--quiet"])
    assert rc == 0
    for name in ("records.csv", "summary.json", "geometry.png"):
        assert (user_dir / "an" / name).is_file(), name
    assert (user_dir / "an" / "geometry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report.read_csv(str(user_dir / "an" / "records.csv"))
    assert [(r["step"], r["kind"], r["sample"]) for r in rows] == [
        (s, k, i) for s in (2, 4) for k, i in [("probe", 0), ("probe", 1), ("probe", 2), ("full", 0)]]
    assert {r["reference"] for r in rows} == {"xstar"}
    summary = json.loads((user_dir / "an" / "summary.json").read_text())
    assert summary["skipped"] == [{"step": 6, "reference": "xstar", "why": "the checkpoint is the reference"}]
    assert summary["mode"] == "eval" and [c["step"] for c in summary["checkpoints"]] == [2, 4, 6]
    logged = {h["step"]: h["learning_rate"] for h in hf.log_history if "learning_rate" in h}
    for r in rows:
        assert r["lr"] == pytest.approx(logged[r["step"] + 1], rel=1e-12)  # the lr of the step taken from x_t

    # independent: transformers' own from_pretrained, eval mode (GPT-2's dropout off), fp64 sums
    samples = R.hf_train_set()
    collate = torch.utils.data.default_collate
    loss = lambda m, b: m(**b).loss
    xstar = dict(transformers.GPT2LMHeadModel.from_pretrained(os.path.join(hf.out, "checkpoint-6")).named_parameters())
    probes = probe_samples(samples, 3, 8)
    by_key = {(r["step"], r["kind"], r["sample"]): r for r in rows}
    for step in (2, 4):
        model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(hf.out, f"checkpoint-{step}"))
        check(by_key[(step, "full", 0)], fp64_abc(model, [collate(samples)], loss, xstar), what=step)
        for k, idx in enumerate(probes):
            check(by_key[(step, "probe", k)], fp64_abc(model, [collate([samples[i] for i in idx])], loss, xstar), what=(step, k))
        with torch.no_grad():
            assert by_key[(step, "full", 0)]["loss"] == pytest.approx(float(loss(model.eval(), collate(samples))), rel=1e-6)
    assert R.file_hashes(hf.out) == hf.hashes  # their checkpoints untouched


def test_hf_output_dir_holding_the_recorded_xstar(user_dir):
    """The README's protocol: run 1 records x* into the Trainer's output_dir (record_reference),
    beside its checkpoint-N folders. analyze takes the checkpoints, leaves x* out with a note
    saying how to use it, and measures against it when it is passed as --reference."""
    transformers = pytest.importorskip("transformers")
    from pathgeom_fast.checkpoints import open_run
    from pathgeom_fast.integrations.hf import PathGeometryCallback

    out = user_dir / "run1"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, save_steps=2,
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=R.hf_train_set())
    PathGeometryCallback.record_reference(trainer, str(out / "xstar.safetensors"))
    trainer.train()
    assert (out / "xstar.trajectory.json").is_file() and (out / "checkpoint-4").is_dir()
    run = open_run(str(out))
    assert [(c.step, c.format) for c in run.checkpoints] == [(2, "hf"), (4, "hf")]
    assert any("xstar.safetensors" in n and "--reference" in n for n in run.notes), run.notes
    (user_dir / "mydata.py").write_text(R.HF_DATA_SOURCE)
    rc = cli.main(["analyze", str(out), "--data", "mydata:train_set", "--reference", str(out / "xstar.safetensors"),
                   "--out", "an", "--probe-batches", "1", "--batch-size", "8", "--quiet"])
    assert rc == 0
    rows = report.read_csv(str(user_dir / "an" / "records.csv"))
    assert {r["step"] for r in rows} == {2} and all(r["c"] > 0 for r in rows)  # step 4 is x* itself
    xstar = dict(transformers.GPT2LMHeadModel.from_pretrained(str(out / "checkpoint-4")).named_parameters())
    at2 = dict(transformers.GPT2LMHeadModel.from_pretrained(str(out / "checkpoint-2")).named_parameters())
    c = sum(float(((at2[k].detach().double() - xstar[k].detach().double()) ** 2).sum()) for k in xstar)
    assert rows[0]["c"] == pytest.approx(c, rel=1e-6)  # fp32 products, fp64 sums (DESIGN's error model)


# ------------------------------------------------------------------------------------------
# Lightning .ckpt, several references
# ------------------------------------------------------------------------------------------


def test_lightning_checkpoints_against_several_references(tmp_path):
    pytest.importorskip("lightning")
    pl = R.lightning_run()
    other = R.lightning_net()  # "another seed's final point": a torch.save state dict
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.save(other.state_dict(), tmp_path / "seed2_final.pt")
    out = tmp_path / "an"
    rc = cli.main([
        "analyze", pl.out, "--model", "checkpoint_runs:lightning_net", "--data", "checkpoint_runs:lightning_data",
        "--reference", "last", "--reference", "first", "--reference", f"seed2={tmp_path / 'seed2_final.pt'}",
        "--reference", os.path.join(pl.out, "last.ckpt"),  # a copy of step 6: x = x* there, never measured
        "--probe-batches", "2", "--batch-size", "16", "--full-batch-size", "24", "--out", str(out), "--quiet",
    ])
    assert rc == 0
    rows = report.read_csv(str(out / "records.csv"))
    steps = {}
    for r in rows:
        steps.setdefault(r["reference"], set()).add(r["step"])
    assert list(steps) == ["xstar", "x0", "seed2", "last"]  # in the order given; xstar is the primary one
    assert steps == {"xstar": {2, 4}, "x0": {4, 6}, "seed2": {2, 4, 6}, "last": {2, 4}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_reference"] == "xstar" and set(summary["by_reference"]) == set(steps)
    assert summary["skipped"] == [
        {"step": 2, "reference": "x0", "why": "the checkpoint is the reference"},
        {"step": 6, "reference": "xstar", "why": "the checkpoint is the reference"},
        {"step": 6, "reference": "last", "why": "x = x* exactly (the same point)"},
    ]

    def state(step):  # Lightning's file read by torch itself; the "net." prefix removed here
        sd = torch.load(os.path.join(pl.out, f"epoch=0-step={step}.ckpt"), weights_only=True)["state_dict"]
        return {k[4:]: v for k, v in sd.items()}

    X, Y = R.lightning_data()
    ds = torch.utils.data.TensorDataset(X, Y)
    full = [(X[i : i + 24], Y[i : i + 24]) for i in range(0, 64, 24)]
    probes = [(X[idx], Y[idx]) for idx in probe_samples(ds, 2, 16)]
    ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    refs = {"xstar": state(6), "x0": state(2), "seed2": other.state_dict(), "last": state(6)}
    model = R.lightning_net()
    for r in rows:
        model.load_state_dict(state(r["step"]))  # BatchNorm running statistics too: eval mode uses them
        batches = full if r["kind"] == "full" else [probes[r["sample"]]]
        check(r, fp64_abc(model, batches, ce, refs[r["reference"]]), what=(r["step"], r["kind"], r["reference"]))
        assert r["lr"] == pytest.approx(0.1 * 0.5 ** (r["step"] // 2), rel=1e-12)


# ------------------------------------------------------------------------------------------
# torch.save files: per-tensor rows and heatmap, eval and train mode
# ------------------------------------------------------------------------------------------

TORCH_MODULE = '''
import torch

def make():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))

def samples():
    gen = torch.Generator().manual_seed(9)
    X, Y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    return [(x, y) for x, y in zip(X, Y)]
'''


def _torch_run(folder):
    ns = {}
    exec(TORCH_MODULE, ns)
    model, data = ns["make"](), ns["samples"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    X = torch.stack([x for x, _ in data])
    Y = torch.stack([y for _, y in data])
    os.makedirs(folder)
    for step in range(5):
        if step % 2 == 0:
            torch.save(model.state_dict(), os.path.join(folder, f"model_step{step}.pt"))
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
    return ns


def test_torch_save_per_tensor_heatmap_and_modes(user_dir):
    ns = _torch_run(str(user_dir / "ckpts"))
    (user_dir / "mymodels.py").write_text(TORCH_MODULE)
    base = ["analyze", "ckpts", "--model", "mymodels:make", "--data", "mymodels:samples", "--probe-batches", "2",
            "--batch-size", "10", "--full-batch-size", "7", "--quiet", "--reference", "first"]
    assert cli.main(base + ["--out", "eval", "--per-tensor", "--heatmap", "rsi"]) == 0
    assert cli.main(base + ["--out", "train1", "--train-mode"]) == 0
    assert cli.main(base + ["--out", "train2", "--train-mode"]) == 0
    rows = report.read_csv("eval/records.csv")
    per = _read_per_tensor("eval/per_tensor.csv")
    assert (user_dir / "eval" / "per_tensor_rsi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {(r["step"], r["reference"]) for r in rows} == {(2, "x0"), (4, "x0")}
    assert all(r["lr"] is None for r in rows)
    data = ns["samples"]()
    collate = torch.utils.data.default_collate
    full = [collate(data[i : i + 7]) for i in range(0, 30, 7)]
    probes = [collate([data[i] for i in idx]) for idx in probe_samples(data, 2, 10)]
    ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    x0 = torch.load(user_dir / "ckpts" / "model_step0.pt", weights_only=True)
    names = [n for n, _ in ns["make"]().named_parameters()]
    for r in rows:
        model = ns["make"]()
        model.load_state_dict(torch.load(user_dir / "ckpts" / f"model_step{r['step']}.pt", weights_only=True))
        batches = full if r["kind"] == "full" else [probes[r["sample"]]]
        check(r, fp64_abc(model, batches, ce, x0), what=(r["step"], r["kind"], r["sample"]))
        # per tensor: each tensor's (a, b, c) in fp64, and they add up to the row
        want = fp64_abc(model, batches, ce, x0, per_tensor=True)
        mine = {t["tensor"]: t for t in per if (t["step"], t["kind"], t["sample"]) == (r["step"], r["kind"], r["sample"])}
        assert list(mine) == names
        for n in names:
            check(mine[n], want[n], what=(r["step"], n))
        for key in "abc":
            assert sum(mine[n][key] for n in names) == pytest.approx(r[key], rel=1e-9, abs=1e-12)
    # train mode: dropout on, with the same seeded masks at every run; differs from eval
    t1, t2 = report.read_csv("train1/records.csv"), report.read_csv("train2/records.csv")
    assert [(r["a"], r["b"]) for r in t1] == [(r["a"], r["b"]) for r in t2]
    assert all(abs(x["b"] - y["b"]) > 1e-6 * y["b"] for x, y in zip(t1, rows))
    assert json.loads((user_dir / "train1" / "summary.json").read_text())["mode"] == "train"


def _read_per_tensor(path):
    rows = report.read_csv(path)
    assert all(r["tensor"] for r in rows)
    return rows


def test_batches_from_data_forms():
    X, Y = torch.randn(10, 3), torch.arange(10)
    probes, full = batches_from_data((X, Y), batch_size=4, probe_batches=2, full_batch_size=6)
    assert [len(b[0]) for b in probes] == [4, 4] and [len(b[0]) for b in full] == [6, 4]
    assert torch.equal(torch.cat([b[0] for b in full]), X)
    dicts = [{"input_ids": list(range(i, i + 5)), "labels": list(range(i, i + 5))} for i in range(6)]  # HF datasets rows
    probes, full = batches_from_data(dicts, batch_size=3, probe_batches=1, full_batch_size=4)
    assert full[0]["input_ids"].shape == (4, 5) and full[0]["input_ids"].dtype == torch.int64
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    probes, full = batches_from_data(loader, probe_batches=2)
    assert len(probes) == 2 and len(full) == 4 and torch.equal(probes[1][0], X[3:6])
    batches = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    probes, full = batches_from_data(batches, probe_batches=1, batched=True)
    assert probes == batches[:1] and full == batches
    with pytest.raises(AnalysisError, match=r"cannot stack the samples into a batch"):
        batches_from_data([(torch.randn(3), 0), (torch.randn(4), 1)], batch_size=2, probe_batches=1)
    with pytest.raises(AnalysisError, match=r"the data is a dict"):
        batches_from_data({"x": X})
    # probe batches as large as the dataset would all be the full batch: refused, unless one
    with pytest.raises(AnalysisError, match=r"probe batch size \(10\) is not below the dataset's 10 samples: all 3"):
        batches_from_data((X, Y), batch_size=10, probe_batches=3)
    probes, full = batches_from_data((X, Y), batch_size=32, probe_batches=1)
    assert len(probes) == 1 and torch.equal(probes[0][0].sort(0).values, X.sort(0).values)


# ------------------------------------------------------------------------------------------
# torch.distributed.checkpoint from a 2-process FSDP2 run: one process, and under torchrun
# ------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_fsdp2_run_single_process_and_torchrun(tmp_path):
    import checkpoint_workers as C

    d = R.fsdp2_dcp_run()
    args = ["analyze", d.out, "--model", "checkpoint_workers:mlp", "--data", "checkpoint_workers:data",
            "--probe-batches", "2", "--batch-size", "8", "--full-batch-size", "16", "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pathgeom_fast.cli"]
        + args + ["--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    X, Y = C.data()
    ds = torch.utils.data.TensorDataset(X, Y)
    full = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 40, 16)]
    probes = [(X[idx], Y[idx]) for idx in probe_samples(ds, 2, 8)]
    ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    for which in ("one", "two"):
        rows = report.read_csv(str(tmp_path / which / "records.csv"))
        assert sorted({r["step"] for r in rows}) == [0, 2, 4] and len(rows) == 3 * 3
        for r in rows:
            model = C.mlp()
            model.load_state_dict(d.saved[r["step"]])
            batches = full if r["kind"] == "full" else [probes[r["sample"]]]
            check(r, fp64_abc(model, batches, ce, d.saved[6]), what=(which, r["step"], r["kind"], r["sample"]))


# ------------------------------------------------------------------------------------------
# Errors users can act on; the snapshot-era API
# ------------------------------------------------------------------------------------------


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, user_dir):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "step_1.pt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "step_2.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.ckpt").write_bytes(b"not a checkpoint at all")
    (user_dir / "mm.py").write_text("import torch\ndef wrong():\n    return torch.nn.Linear(4, 2)\n"
                                   "def data():\n    return torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
                                   "def broken():\n    raise RuntimeError('no data today')\n")
    run = ["analyze", str(tmp_path), "--data", "mm:data", "--batch-size", "4", "--quiet", "--out", str(tmp_path / "o")]
    cases = [
        (["analyze", str(tmp_path / "nope"), "--data", "mm:data"], r"nope does not exist"),
        (["analyze", str(tmp_path / "bad"), "--model", "mm:wrong", "--data", "mm:data"], r"x.ckpt is not a readable torch checkpoint"),
        (run + ["--model", "nocolon"], r"--model must look like 'package.module:function', got 'nocolon'"),
        (run + ["--model", "no_such_module_xyz:f"], r"no module named 'no_such_module_xyz'"),
        (run + ["--model", "mm:nothing"], r"module mm has no attribute 'nothing'"),
        (run + ["--model", "mm:wrong"], r"reference file .*step_2.pt: 'weight' has shape \[2, 3\] but the model's parameter has \[2, 4\]"),
        (run, r"--model module:function is needed: the torch checkpoints in .* do not describe their model"),
        (["analyze", str(tmp_path), "--model", "torch.nn:Identity", "--data", "mm:data", "--batch-size", "4"],
         r"the model has no trainable parameters"),
        (["analyze", str(tmp_path), "--model", "mm:wrong", "--data", "mm:broken"], r"--data 'mm:broken' raised RuntimeError: no data today"),
        (run[:4] + ["--model", "mm:wrong"], r"the probe batch size \(32\) is not below the dataset's 8 samples"),
    ]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("pathgeom analyze: error: ")
        assert re.search(msg, err), (msg, err)
    with pytest.raises(FileNotFoundError):
        cli.main(["analyze", str(tmp_path / "nope"), "--data", "mm:data", "--debug"])
    # the installed command: exit status 2, no traceback
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "pathgeom_fast.cli", "analyze", str(tmp_path / "bad"), "--model", "mm:wrong",
                          "--data", "mm:data"], capture_output=True, text=True, env=env, cwd=str(user_dir))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("argv, msg", [
    (["--lr", "-1"], "--lr: must be a finite number above 0, got -1"),
    (["--lr", "nan"], "--lr: must be a finite number above 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be a finite number >= 0, got -0.1"),
    (["--clip-grad-norm", "x"], "--clip-grad-norm: expected a number >= 0, got 'x'"),
])
def test_demo_numbers_are_checked_by_the_parser(capsys, argv, msg):
    """A one-line usage error, not the optimizer's traceback after the set-up."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_help_shows_defaults_without_contradicting_flags(capsys):
    """--eval is the default mode: its help says so and no '(default: False)' follows; bench's
    --device and --backends say what their defaults are once."""
    for cmd in ("analyze", "bench"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: False)" not in text and "(default: None)" not in text, cmd
        assert "(default: 32)" in text if cmd == "analyze" else "(default: 1e+08; --quick: 5e+06)" in text
    assert "cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)" in text


def test_demo_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", "0"])
    assert exc.value.code == 2
    assert "--steps: must be at least 1, got 0" in capsys.readouterr().err


def test_analyze_api_on_our_snapshots(tmp_path):
    from pathgeom_fast.snapshots import SnapshotRecorder, analyze_snapshots

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    X, Y = torch.randn(24, 4), torch.randint(0, 2, (24,))
    rec = SnapshotRecorder(model, str(tmp_path / "s"), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        rec.maybe_save(step, lr=0.1 * (step + 1))
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
    probes, full = [(X[:8], Y[:8])], [(X, Y)]
    records, _ = analyze_snapshots(str(tmp_path / "s"), model, None, probes, full, progress=False)
    assert [(r["step"], r["kind"]) for r in records] == [(0, "probe"), (0, "full"), (1, "probe"), (1, "full")]
    assert [r["lr"] for r in records] == [0.1, 0.1, 0.2, 0.2]
    # snapshots hold only the trainable parameters: the BatchNorm statistics are the model's own, said in notes
    res = analyze(str(tmp_path / "s"), model, probes, full, references=["first"], progress=False)
    assert any("BatchNorm" in n and "running_mean" in n for n in res.notes)
    with pytest.raises(AnalysisError, match="nothing to measure"):
        analyze(str(tmp_path / "s"), model, [], None, progress=False)
    with pytest.raises(AnalysisError, match=r"two references are named 'x0'"):
        analyze(str(tmp_path / "s"), model, probes, references=["first", "x0"], progress=False)
