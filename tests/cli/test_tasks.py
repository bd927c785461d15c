"""The demo's presets (--task mlp|cnn|resnet|wide-mlp|lm) end to end with tiny sizes, and the new
measurements (Adam with coupled L2 and clipping measured before clipping, the weight-decay
variants, the x_0 and cross-seed references, the step-size summary) against an fp64
recomputation from flattened copies."""

import json
import math

import pytest
import torch

from pathgeom_fast import cli, demo, report, tasks
from pathgeom_fast.snapshots import load_snapshot

TINY = {
    "mlp": ["--width", "16", "--depth", "2"],
    "cnn": ["--width", "4"],
    "resnet": ["--width", "4"],
    "wide-mlp": ["--width", "24", "--depth", "4"],
    "lm": ["--width", "16", "--depth", "1", "--context", "8", "--train-size", "48"],
}
COMMON = ["--steps", "8", "--probe-every", "4", "--probe-batches", "2", "--batch-size", "8", "--lags", "1,2,5",
          "--lag-every", "2", "--snapshot-every", "4", "--x0-reference", "--quiet"]


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def abc(g, x, r):
    d = x - r
    return torch.stack([g @ d, g @ g, d @ d])


def check_row(row, want, what):
    assert abs(row["a"] - want[0].item()) <= 1e-5 * math.sqrt(want[1] * want[2]) + 1e-12, (what, row, want)
    assert row["b"] == pytest.approx(want[1].item(), rel=1e-5), (what, row, want)
    assert row["c"] == pytest.approx(want[2].item(), rel=1e-5), (what, row, want)


def test_default_sizes_and_parameter_counts():
    with torch.device("meta"):  # counts without allocating the 50M-parameter model
        counts = {name: sum(p.numel() for p in t.model().parameters()) for name, t in tasks.TASK_SPECS.items()}
    assert counts == {"mlp": 26_122, "cnn": 10_026, "resnet": 5_122, "wide-mlp": 50_651_146, "lm": 470_528}
    with torch.device("meta"):
        wide = tasks.TASK_SPECS["wide-mlp"].model()
    assert [m.out_features for m in wide if isinstance(m, torch.nn.Linear)] == [4096, 4096, 4096, 4096, 10]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tasks.TASK_SPECS["cnn"].model().modules())


def _count(model, kind=None):
    mods = [model] if kind is None else [m for m in model.modules() if isinstance(m, kind)]
    return sum(p.numel() for m in mods for p in m.parameters())


@pytest.mark.parametrize("task,width", [("cnn", 16), ("cnn", 5), ("resnet", 8), ("resnet", 3)])
def test_no_batchnorm_drops_exactly_the_batchnorm_affine_parameters(task, width):
    spec = tasks.TASK_SPECS[task]
    with_bn, without = spec.model({"width": width}), spec.model({"width": width, "batchnorm": False})
    bn = _count(with_bn, torch.nn.BatchNorm2d)
    assert bn == 2 * sum(m.num_features for m in with_bn.modules() if isinstance(m, torch.nn.BatchNorm2d)) > 0
    assert _count(with_bn) - _count(without) == bn
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in without.modules())
    assert not list(without.buffers())  # no running statistics either
    # nothing else changed: the same tensors, by name and shape, less the BatchNorm ones
    bn_names = {f"{n}.{p}" for n, m in with_bn.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias")}
    assert {n: p.shape for n, p in without.named_parameters()} == {
        n: p.shape for n, p in with_bn.named_parameters() if n not in bn_names}
    x = tasks.digits_data(n=5)[0]
    assert without(x).shape == with_bn(x).shape == (5, 10)


def test_resnet_skip_connections_and_their_ablation():
    spec = tasks.TASK_SPECS["resnet"]
    torch.manual_seed(0)
    res = spec.model()
    torch.manual_seed(0)
    plain = spec.model({"skip": False})
    proj = res.block2.proj
    assert proj is not None and plain.block2.proj is None and res.block1.proj is None  # identity shortcut in block 1
    assert _count(res) - _count(plain) == _count(proj) == 8 * 16 + 2 * 16
    assert _count(spec.model({"skip": False, "batchnorm": False})) == 4_850
    # with the same weights, the residual network's block output is the plain block's plus the shortcut
    x = torch.randn(3, 8, 8, 8)
    b1, p1 = res.block1.eval(), plain.block1.eval()
    p1.load_state_dict(b1.state_dict())
    inner = b1.bn2(b1.conv2(torch.relu(b1.bn1(b1.conv1(x)))))
    assert torch.allclose(b1(x), torch.relu(inner + x)) and torch.allclose(p1(x), torch.relu(inner))
    assert "no skip connections" in spec.describe({"skip": False}) and "without BatchNorm" in tasks.TASK_SPECS["cnn"].describe(
        {"batchnorm": False})


@pytest.mark.parametrize("task", ["mlp", "cnn", "resnet", "lm"])
def test_init_scale_multiplies_every_parameter_of_the_default_init(task):
    spec = tasks.TASK_SPECS[task]
    small = {"lm": {"width": 16, "depth": 1, "context": 8}}.get(task, {"width": 4})
    torch.manual_seed(3)
    ref = dict(spec.model(small).named_parameters())
    torch.manual_seed(3)
    scaled = dict(spec.model({**small, "init_scale": 2.5}).named_parameters())
    assert scaled.keys() == ref.keys()
    for n, p in scaled.items():
        assert torch.equal(p, ref[n] * 2.5), n
    assert "init x2.5" in spec.describe({"init_scale": 2.5})


def test_ablation_switches_that_do_not_apply_are_refused(capsys):
    with pytest.raises(ValueError, match=r"^--no-skip does not apply to the mlp task \(its model has no skip connections; it applies to: resnet\)$"):
        demo.DemoConfig(task="mlp", skip=False)
    with pytest.raises(ValueError, match=r"^--no-batchnorm does not apply to the lm task .* it applies to: cnn, resnet\)$"):
        demo.DemoConfig(task="lm", batchnorm=False)
    with pytest.raises(ValueError, match="--no-skip does not apply to the cnn task"):
        demo.DemoConfig(task="cnn", skip=False)
    with pytest.raises(ValueError, match="--init-scale must be a finite number above 0"):
        demo.DemoConfig(init_scale=float("nan"))
    assert demo.DemoConfig(task="wide-mlp", init_scale=0.5).init_scale == 0.5  # every task has it
    assert cli.main(["demo", "--task", "mlp", "--no-skip", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err == "pathgeom demo: error: --no-skip does not apply to the mlp task (its model has no skip connections; it applies to: resnet)\n"
    assert cli.main(["demo", "--task", "wide-mlp", "--no-batchnorm", "--out", "unused"]) == 2
    assert "--no-batchnorm does not apply to the wide-mlp task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--init-scale", "-1", "--out", "unused"])
    assert "--init-scale: must be a finite number above 0" in capsys.readouterr().err


@pytest.mark.parametrize("task,flags,shown", [("cnn", ["--no-batchnorm"], "without BatchNorm"),
                                              ("resnet", ["--no-skip"], "no skip connections"),
                                              ("mlp", ["--init-scale", "3", "--snapshot-every", "2"], "init x3")])
def test_ablation_runs_record_their_switches(task, flags, shown, tmp_path):
    out = tmp_path / task
    args = ["demo", "--task", task, "--out", str(out), "--steps", "4", "--probe-every", "2", "--probe-batches", "1",
            "--batch-size", "8", "--lags", "none", "--snapshot-every", "0", "--no-cross-seed", "--no-x0-reference",
            "--quiet"] + TINY[task] + flags
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert (cfg["batchnorm"], cfg["skip"], cfg["init_scale"]) == (
        "--no-batchnorm" not in flags, "--no-skip" not in flags, 3.0 if "--init-scale" in flags else 1.0)
    assert shown in summary["task_description"]
    # the title of geometry.png and findings.md (the same string) names the ablation
    first = (out / "findings.md").read_text().splitlines()[0]
    assert first.startswith(f"# Findings: {task}: ") and shown in first
    with torch.device("meta"):
        want = tasks.get_task(task).model(demo.DemoConfig(**{k: v for k, v in cfg.items() if k != "fsdp"}).sizes)
    assert summary["numel"] == _count(want)
    if task == "mlp":  # x_0 of the run is 3 x the default initialisation from the same seed
        from pathgeom_fast.snapshots import load_snapshot

        torch.manual_seed(0)
        ref = tasks.get_task("mlp").model({"width": 16})
        x0 = load_snapshot(str(out / "snapshots" / "step_00000000.safetensors"))[0]
        for n, p in ref.named_parameters():
            assert torch.equal(x0[n], 3 * p.detach()), n


def test_lm_data_is_the_shipped_text_shifted_by_one():
    from pydoc_data.topics import topics

    X, Y = tasks.lm_data(n=40, context=16)
    assert X.shape == Y.shape == (40, 16) and X.dtype == torch.int64
    assert torch.equal(X[:, 1:], Y[:, :-1])
    assert int(X.max()) < 256 and int(X.min()) >= 0
    text = bytes(X[7].tolist() + [Y[7, -1].item()]).decode("utf-8", errors="ignore")
    corpus = "\n\n".join(topics[k] for k in sorted(topics))
    assert len(corpus) > 400_000 and text.strip()[:8] in corpus
    with pytest.raises(ValueError, match="--train-size for the lm task"):
        tasks.lm_data(n=10**9)


def test_config_takes_the_task_defaults_and_checks_options(capsys):
    lm = demo.DemoConfig(task="lm")
    assert (lm.optimizer, lm.clip_grad_norm, lm.weight_decay) == ("adam-l2", 0.25, 1e-5)
    assert demo.DemoConfig(task="lm", optimizer="nesterov", clip_grad_norm=0).optimizer == "nesterov"
    assert demo.DemoConfig(model="cnn").task == "cnn"  # the old --model
    assert demo.DemoConfig().lags == demo.PAPER_LAGS
    with pytest.raises(ValueError, match="--task must be one of"):
        demo.DemoConfig(task="vgg")
    with pytest.raises(ValueError, match="disagree"):
        demo.DemoConfig(task="lm", model="cnn")
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        demo.DemoConfig(optimizer="lion")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--lags", "1,x", "--out", "unused"])
    assert "--lags must be comma-separated positive integers" in capsys.readouterr().err
    assert cli.main(["demo", "--task", "lm", "--model", "cnn", "--out", "unused"]) == 2
    assert "--model 'cnn' and --task 'lm' disagree" in capsys.readouterr().err
    opt = demo.make_optimizer(demo.DemoConfig(optimizer="adam-l2", weight_decay=0.1), [torch.nn.Parameter(torch.ones(2))])
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.1
    opt = demo.make_optimizer(demo.DemoConfig(optimizer="nesterov"), [torch.nn.Parameter(torch.ones(2))])
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert type(demo.make_optimizer(demo.DemoConfig(optimizer="adamw"), [torch.nn.Parameter(torch.ones(2))])) is torch.optim.AdamW


@pytest.fixture(scope="module", params=list(TINY))
def task_run(request, tmp_path_factory):
    task = request.param
    out = tmp_path_factory.mktemp(task)
    args = ["demo", "--task", task, "--out", str(out)] + TINY[task] + COMMON
    if task == "lm":  # the new variants, fp64-checked below: coupled L2, clipping, both references
        args += ["--weight-decay", "0.01", "--cross-seed"]
    assert cli.main(args) == 0
    return task, out


def test_each_task_writes_the_report(task_run):
    task, out = task_run
    for name in ("records.csv", "summary.json", "geometry.png", "findings.md", "xstar.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["replay_final_distance_ratio"] == 0.0
    rows = report.read_csv(str(out / "records.csv"))
    kinds = {r["kind"] for r in rows}
    assert {"minibatch", "update", "probe", "full", "lagged"} <= kinds
    assert {r["reference"] for r in rows} >= {"xstar", "x0"}
    assert sorted({(r["step"], r["sample"]) for r in rows if r["kind"] == "lagged"}) == [
        (t, k) for t in (0, 2, 4, 6) for k in (1, 2, 5) if t + k < 8]
    assert set(summary["lagged"]) == {"1", "2", "5"}
    cut = summary["overall_steps_below"]
    for k in ("1", "2", "5"):  # the summary's quantiles are those of the rows
        cos = sorted(r["cos"] for r in rows if r["kind"] == "lagged" and r["sample"] == int(k) and r["step"] + int(k) < cut)
        assert summary["lagged"][k]["n"] == len(cos) and summary["lagged"][k]["cos"]["q0"] == pytest.approx(cos[0])
    findings = (out / "findings.md").read_text()
    for claim in ("RSI stays positive", "cos > 0", "EB is bounded", "warm-up then decay", "contraction rate"):
        assert claim in findings
    verdicts = ("**holds**", "**does not hold here**", "**not measured**", "**no verdict**")
    assert sum(findings.count(v) for v in verdicts) == 5  # 8 steps: too few rows, "no verdict" where measured
    assert "Lagged orthogonal cosine" in findings and "x_0 as the reference" in findings


def _replay_lm(out, cfg, steps_to_check):
    """Replays the lm run independently, checking rows against fp64 from flattened copies."""
    X, Y = tasks.get_task("lm").data(cfg.sizes)
    order = demo.batch_order(len(X), cfg)
    rows = {(r["step"], r["kind"], r["sample"], r["reference"]): r for r in report.read_csv(str(out / "records.csv"))}
    torch.manual_seed(cfg.seed)
    model = tasks.get_task("lm").model(cfg.sizes)
    names = [n for n, _ in model.named_parameters()]
    refs = {"xstar": flat(load_snapshot(str(out / "xstar.safetensors"))[0][n] for n in names),
            "xstar_seed1": flat(load_snapshot(str(out / "xstar_seed1.safetensors"))[0][n] for n in names),
            "x0": flat(model.parameters())}
    assert not torch.equal(refs["xstar"], refs["xstar_seed1"])
    opt = demo.make_optimizer(cfg, model.parameters())
    assert type(opt) is torch.optim.Adam  # adam-l2: coupled L2
    wd, clipped = cfg.weight_decay, 0
    full = [(X[i : i + 256], Y[i : i + 256]) for i in range(0, len(X), 256)]
    probes = demo.probe_set(X, Y, cfg)
    for step in range(max(steps_to_check) + 1):
        for g in opt.param_groups:
            g["lr"] = demo.lr_at(step, cfg)
        loss = demo.loss_fn(model, (X[order[step]], Y[order[step]]))
        loss.backward()
        x, g = flat(model.parameters()), flat(p.grad for p in model.parameters())
        if step in steps_to_check:
            if step % cfg.probe_every == 0:
                gf = flat(torch.autograd.grad(demo.loss_fn(model, full[0]), list(model.parameters())))
                gp = [flat(torch.autograd.grad(demo.loss_fn(model, b), list(model.parameters()))) for b in probes]
            for name, r in refs.items():
                if name == "x0" and step == 0:
                    continue  # x = x0: c = 0
                check_row(rows[(step, "minibatch", 0, name)], abc(g, x, r), (step, "minibatch", name))
                check_row(rows[(step, "minibatch_wd", 0, name)], abc(g + wd * x, x, r), (step, "minibatch_wd", name))
                if step % cfg.probe_every == 0:
                    check_row(rows[(step, "full", 0, name)], abc(gf, x, r), (step, "full", name))
                    check_row(rows[(step, "full_wd", 0, name)], abc(gf + wd * x, x, r), (step, "full_wd", name))
                    for k, gk in enumerate(gp):
                        check_row(rows[(step, "probe", k, name)], abc(gk, x, r), (step, "probe", k, name))
                        check_row(rows[(step, "probe_wd", k, name)], abc(gk + wd * x, x, r), (step, "probe_wd", k, name))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        clipped += bool(norm > cfg.clip_grad_norm)
        opt.step()
        if step in steps_to_check:  # Adam's update after clipping, measured against x_t
            u = x - flat(model.parameters())
            for name, r in refs.items():
                if not (name == "x0" and step == 0):
                    check_row(rows[(step, "update", 0, name)], abc(u, x, r), (step, "update", name))
            mb, up = rows[(step, "minibatch", 0, "xstar")], rows[(step, "update", 0, "xstar")]
            assert math.sqrt(up["b"] / mb["b"]) == pytest.approx((u.norm() / g.norm()).item(), rel=1e-5)
        opt.zero_grad(set_to_none=True)
    return clipped


@pytest.mark.parametrize("task_run", ["lm"], indirect=True)  # the lm run (above) carries the new variants
def test_lm_rows_match_fp64_before_clipping(task_run):
    task, out = task_run
    summary = json.loads((out / "summary.json").read_text())
    cfg = demo.DemoConfig(**{k: v for k, v in summary["config"].items() if k not in ("fsdp",)})
    assert len(tasks.get_task("lm").data(cfg.sizes)[0]) <= 256  # one chunk: the full batch above is exact
    clipped = _replay_lm(out, cfg, steps_to_check=(0, 3, 4))
    assert clipped > 0, "clipping at 0.25 never acted: the before-clipping check would prove nothing"
    assert summary["cross_seed"]["name"] == "xstar_seed1"
    assert set(summary["by_reference"]) == {"xstar", "xstar_seed1", "x0"}
    assert summary["lr_comparable_to_eta_star"] is False
