"""Checkpoint readers against files written by the real libraries: Hugging Face Trainer and
save_pretrained, Lightning ModelCheckpoint, torch.save, torch.distributed.checkpoint (also from a
2-process FSDP2 run). Every value read is compared with the library's own reading of the file,
or with the tensors that were saved."""

import os
import pickle

import pytest
import torch

import checkpoint_runs as R
from pathgeom_fast.checkpoints import (
    CheckpointError,
    CheckpointKeyError,
    Reference,
    check_reference_file,
    load_state_dict,
    open_checkpoint,
    open_run,
    step_from_name,
)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def perturbed(model, scale=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: (t + scale * torch.randn(t.shape, generator=gen)) if t.is_floating_point() else t.clone()
            for n, t in model.state_dict().items()}


def assert_model_holds(model, state, prefix=""):
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[prefix + n].to(t.dtype)), n


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------


def test_hf_trainer_output_dir():
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    hf = R.hf_trainer_run()
    run = open_run(hf.out)
    assert [c.step for c in run] == [2, 4, 6] and run.format == "hf" and not run.notes
    assert run.config_dir == os.path.join(hf.out, "checkpoint-6")
    # lr = the learning rate of the step taken from the checkpoint: what the Trainer logged for step N + 1
    logged = {h["step"]: h["learning_rate"] for h in hf.log_history if "learning_rate" in h}
    assert run.checkpoints[0].lr == pytest.approx(logged[3], rel=1e-12)
    assert run.checkpoints[1].lr == pytest.approx(logged[5], rel=1e-12)
    assert run.checkpoints[2].lr == pytest.approx(hf.final_lr, abs=1e-15)  # the scheduler after step 6
    model = transformers.GPT2LMHeadModel(transformers.AutoConfig.from_pretrained(run.config_dir))
    match = run.checkpoints[1].load_into(model)
    assert match.prefix == ("", "") and match.missing_optional == []
    want = load_file(os.path.join(hf.out, "checkpoint-4", "model.safetensors"))
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n
    # one checkpoint folder, or its weights file, is one checkpoint with the same step and lr
    one = open_checkpoint(os.path.join(hf.out, "checkpoint-4"))
    f = open_checkpoint(os.path.join(hf.out, "checkpoint-4", "model.safetensors"))
    assert (one.step, one.lr) == (f.step, f.lr) == (4, run.checkpoints[1].lr)
    assert R.file_hashes(hf.out) == hf.hashes  # nothing of theirs was changed


def test_hf_trainer_lr_from_the_log_without_scheduler_state(tmp_path):
    """save_only_model=True leaves no scheduler.pt/optimizer.pt: the lr comes from the Trainer's log."""
    import json
    import shutil

    transformers = pytest.importorskip("transformers")

    hf = R.hf_trainer_run()
    out = tmp_path / "hf_out"
    shutil.copytree(hf.out, out)
    for step in (2, 4, 6):
        for name in ("scheduler.pt", "optimizer.pt"):
            (out / f"checkpoint-{step}" / name).unlink()
    run = open_run(str(out))
    logged = {h["step"]: h["learning_rate"] for h in hf.log_history if "learning_rate" in h}
    assert [c.lr for c in run] == [logged[3], logged[5], None]
    assert run.notes == ["1 of 3 checkpoints do not tell their learning rate (the lr column stays empty)"]
    # A Trainer before transformers 4.51 logged at step s the rate after the scheduler's step s,
    # i.e. the rate of step s + 1: then the entry of step s itself is the one (the version is
    # read from each checkpoint's config.json; here rewritten, as those versions would have).
    for step in (2, 4, 6):
        cfg = out / f"checkpoint-{step}" / "config.json"
        state = json.loads(cfg.read_text())
        assert state["transformers_version"] == transformers.__version__
        cfg.write_text(json.dumps({**state, "transformers_version": "4.50.3"}))
    assert [c.lr for c in open_run(str(out))] == [logged[2], logged[4], logged[6]]
    cfg.write_text(json.dumps({**state, "transformers_version": "4.51.0"}))
    assert open_run(str(out)).checkpoints[2].lr is None  # 4.51 logs the step just taken: no step 7


def test_hf_save_pretrained_sharded_single_bin_and_base_model_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model.save_pretrained(tmp_path / "single")
    # the pytorch_model.bin of older transformers: torch.save of the state dict, next to config.json
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    want = load_file(str(tmp_path / "single" / "model.safetensors"))
    for folder in ("sharded", "single", "bin"):
        ck = open_checkpoint(str(tmp_path / folder))
        assert ck.format == "hf" and ck.step is None and ck.lr is None
        got = ck.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), (folder, k)
        ref = Reference.from_file(model, str(tmp_path / folder), name="x")
        assert [torch.equal(t, p) for t, p in zip(ref.tensors, model.parameters())] == [True] * len(ref.tensors)
    # a base GPT2Model reads the LM head model's checkpoint: the 'transformer.' prefix is matched
    base = transformers.GPT2Model(cfg)
    m = open_checkpoint(str(tmp_path / "sharded")).match(base)
    assert m.prefix == ("transformer.", "")
    open_checkpoint(str(tmp_path / "sharded")).load_into(base)
    for n, p in base.named_parameters():
        assert torch.equal(p, want["transformer." + n]), n
    with pytest.raises(CheckpointError, match="one shard of a sharded checkpoint"):
        open_checkpoint(str(tmp_path / "sharded" / shards[0]))


# ------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------


def test_lightning_checkpoints():
    pytest.importorskip("lightning")
    pl = R.lightning_run()
    run = open_run(pl.out)
    assert [c.step for c in run] == [2, 4, 6] and run.format == "lightning"
    assert [os.path.basename(c.path) for c in run] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    assert run.notes == [f"left out {os.path.join(pl.out, 'last.ckpt')}: same step 6 as {run.checkpoints[-1].path}"]
    # StepLR(2, 0.5) from 0.1, stepped every optimizer step: the lr of step N + 1
    for c in run:
        assert c.lr == pytest.approx(0.1 * 0.5 ** (c.step // 2), rel=1e-12)
    net = R.lightning_net()
    match = run.checkpoints[0].load_into(net)
    assert match.prefix == ("net.", "")
    theirs = torch.load(run.checkpoints[0].path, weights_only=True)["state_dict"]
    assert_model_holds(net, theirs, "net.")  # BatchNorm running statistics included
    assert int(net[1].num_batches_tracked) == 2
    assert R.file_hashes(pl.out) == pl.hashes
    # the whole lightning_logs tree: the only folder holding checkpoints is found and said
    run2 = open_run(os.path.dirname(pl.out))
    assert [c.step for c in run2] == [2, 4, 6] and run2.notes[0].startswith(f"using {pl.out}")


# ------------------------------------------------------------------------------------------
# torch.save: prefixes, containers, refusal of pickled code
# ------------------------------------------------------------------------------------------


def test_torch_save_wrappers_and_containers(tmp_path):
    model = mlp()
    state = perturbed(model)
    src = mlp()
    src.load_state_dict(state)
    # DataParallel's "module.", torch.compile's "_orig_mod." (state dicts of the real wrappers)
    torch.save(torch.nn.DataParallel(src).state_dict(), tmp_path / "dp.pt")
    torch.save(torch.compile(src).state_dict(), tmp_path / "compiled.pth")
    torch.save({"model": src.state_dict(), "optimizer": torch.optim.SGD(src.parameters(), lr=0.25).state_dict(),
                "global_step": 7}, tmp_path / "container.pt")
    for name in ("dp.pt", "compiled.pth", "container.pt"):
        target = mlp()
        ck = open_checkpoint(str(tmp_path / name))
        ck.load_into(target)
        assert_model_holds(target, state)
    ck = open_checkpoint(str(tmp_path / "container.pt"))
    assert (ck.step, ck.lr, ck.format) == (7, 0.25, "torch")
    assert ck.match(mlp()).prefix == ("model.", "")
    # a compiled model reads a plain state dict too
    compiled = torch.compile(mlp())
    torch.save(state, tmp_path / "plain.pt")
    open_checkpoint(str(tmp_path / "plain.pt")).load_into(compiled)
    assert_model_holds(compiled._orig_mod, state)


def test_ambiguous_prefix_needs_key_prefix(tmp_path):
    model = mlp()
    a, b = perturbed(model, seed=1), perturbed(model, seed=2)
    torch.save({"model": a, "ema": b}, tmp_path / "two.pt")
    ck = open_checkpoint(str(tmp_path / "two.pt"))
    with pytest.raises(CheckpointError, match=r"under 2 different prefixes \('ema.', 'model.'\); choose one with --key-prefix"):
        ck.match(model)
    ck.load_into(model, key_prefix="ema")
    assert_model_holds(model, b)
    ref = Reference.from_file(model, str(tmp_path / "two.pt"), key_prefix="model.")
    assert all(torch.equal(t, a[n]) for n, t in zip(ref.names, ref.tensors))
    with pytest.raises(CheckpointKeyError, match=r"with key prefix 'opt' the model's parameter '0.weight' would be 'opt.0.weight'"):
        ck.match(model, key_prefix="opt")


def test_keys_that_do_not_fit_the_model(tmp_path):
    model = mlp()
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
    torch.save(other.state_dict(), tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"'2.weight' has shape \[4, 7\] but the model's parameter has \[3, 7\]"):
        Reference.from_file(model, str(tmp_path / "shape.pt"))
    torch.save({"encoder.w": torch.randn(3)}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointKeyError, match=r"lacks 4 of the model's 4 trainable parameters, first '0.weight'.*no prefix"):
        open_checkpoint(str(tmp_path / "keys.pt")).load_into(model)
    extra = dict(model.state_dict(), **{"3.weight": torch.randn(2)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 key\(s\) that are not parameters or buffers of the model, first '3.weight'"):
        open_checkpoint(str(tmp_path / "extra.pt")).load_into(model)
    torch.save([torch.randn(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"holds a list, not a state dict"):
        open_checkpoint(str(tmp_path / "list.pt"))


class _Boom:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_needing_pickled_code_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.randn(2), "obj": _Boom(str(marker))}, tmp_path / "evil_zip.pt")
    torch.save({"w": _Boom(str(marker))}, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    assert not marker.exists()  # saving pickles the call, it does not make it
    for name in ("evil_zip.pt", "evil_legacy.pt"):
        with pytest.raises(CheckpointError, match=r"cannot be read without running code stored in it \(it needs (io|builtins).open"):
            open_checkpoint(str(tmp_path / name))
    with open(tmp_path / "raw.pkl.pt", "wb") as f:  # a plain pickle, not even torch's format
        pickle.dump({"w": _Boom(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"raw.pkl.pt cannot be read without running code stored in it"):
        open_checkpoint(str(tmp_path / "raw.pkl.pt"))
    torch.save(mlp(), tmp_path / "whole_model.pt")  # a pickled nn.Module
    with pytest.raises(CheckpointError, match=r"it needs torch.nn.modules.container.Sequential"):
        open_run(str(tmp_path / "whole_model.pt"))
    assert not marker.exists()
    (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.ckpt is not a readable torch checkpoint"):
        open_checkpoint(str(tmp_path / "junk.ckpt"))


def test_run_listing_and_errors(tmp_path):
    model = mlp()
    for step in (10, 30, 20):
        torch.save(perturbed(model, seed=step), tmp_path / f"model_step{step}.pt")
    torch.save(torch.optim.SGD(model.parameters(), lr=1).state_dict(), tmp_path / "optimizer.pt")  # not weights
    run = open_run(str(tmp_path))
    assert [c.step for c in run] == [10, 20, 30] and run.format == "torch"
    torch.save(perturbed(model), tmp_path / "final.pt")
    with pytest.raises(CheckpointError, match=r"cannot tell the step of .*final.pt"):
        open_run(str(tmp_path))
    (tmp_path / "final.pt").unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*empty"):
        open_run(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"holds 3 checkpoints \(steps \[10, 20, 30\]\); pass one of them"):
        open_checkpoint(str(tmp_path))
    assert [step_from_name(n) for n in ("step_00000120.safetensors", "epoch=3-step=600.ckpt", "global_step100",
                                        "checkpoint-20", "iter_300.pt", "epoch=3.ckpt", "ema.pt")] == [120, 600, 100, 20, 300, None, None]
    # check_reference_file accepts every format
    info = check_reference_file(str(tmp_path / "model_step10.pt"))
    assert info["0.weight"] == (torch.float32, [7, 5])


# ------------------------------------------------------------------------------------------
# torch.distributed.checkpoint
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_single_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    saved = {}
    for step in (0, 1, 2):
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                 checkpoint_id=str(tmp_path / "run" / f"ckpt_{step}"), no_dist=True)
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    run = open_run(str(tmp_path / "run"))
    assert [c.step for c in run] == [0, 1, 2] and run.format == "dcp" and [c.lr for c in run] == [0.01] * 3
    target = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    for c in run:
        assert c.load_into(target).prefix == ("model.", "")
        assert_model_holds(target, saved[c.step])
    # the same values as DCP's own conversion to a torch.save file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "run" / "ckpt_1"), str(tmp_path / "conv.pt"))
    theirs = torch.load(tmp_path / "conv.pt", weights_only=True)["model"]
    got = load_state_dict(str(tmp_path / "run" / "ckpt_1"))
    for k, v in theirs.items():
        assert torch.equal(got["model." + k], v), k


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_is_not_unpickled_freely(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = mlp()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert open_checkpoint(str(tmp_path / "ok" / ".metadata")).step is None
    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / ".metadata", "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    with pytest.raises(CheckpointError, match=r"\.metadata is not readable as DCP metadata \((io|builtins).open is not a torch.distributed.checkpoint metadata type"):
        open_checkpoint(str(tmp_path / "evil")).info()
    assert not marker.exists()


@pytest.mark.distributed
def test_dcp_from_fsdp2_run_read_sharded():
    """A 2-process FSDP2 run saves with torch.distributed.checkpoint; each rank reads back only its
    shards (references and model), equal to the full tensors that were saved (checked in the
    worker); a single process reads the same checkpoints into a plain model."""
    import checkpoint_workers as C

    dcp_run = R.fsdp2_dcp_run()
    run = open_run(dcp_run.out)
    assert [c.step for c in run] == [0, 2, 4, 6]
    model = C.mlp()
    for c in run:
        c.load_into(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, dcp_run.saved[c.step][n]), (c.step, n)
    assert R.file_hashes(dcp_run.out) == dcp_run.hashes


def test_accelerate_save_state_folders(tmp_path):
    """Accelerate's save_state folders, written by the real library: its automatic names
    (checkpoint_0, checkpoint_1, ...) count saves, not steps, and are refused with a way out;
    folders the user names by step are read, with the lr of the step taken from them."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import ProjectConfiguration

    def train(acc, save):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        model, opt, sched = acc.prepare(model, opt, sched)
        seen = {}
        for step in range(1, 7):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            if step % 2 == 0:
                save(step)
                seen[step] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, sched.get_last_lr()[0])
        return seen

    auto = accelerate.Accelerator(project_config=ProjectConfiguration(project_dir=str(tmp_path / "auto"), automatic_checkpoint_naming=True))
    train(auto, lambda step: auto.save_state())
    assert sorted(os.listdir(tmp_path / "auto" / "checkpoints")) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    with pytest.raises(CheckpointError, match=r"Accelerate's automatic checkpoint names count saves .* accelerator\.save_state\(f'\{run_dir\}/step_\{step\}'\)"):
        open_run(str(tmp_path / "auto" / "checkpoints"))

    named = accelerate.Accelerator()
    seen = train(named, lambda step: named.save_state(str(tmp_path / "named" / f"step_{step}")))
    run = open_run(str(tmp_path / "named"))
    assert [c.step for c in run] == [2, 4, 6]
    for ck in run:
        weights, lr = seen[ck.step]
        assert ck.lr == pytest.approx(lr, rel=1e-12)  # the scheduler's lr after step N: that of step N + 1
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        ck.load_into(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), (ck.step, k)


def test_tied_weights_state_dict_is_a_reference(tmp_path):
    """A model with a tied weight (output layer = token embedding, as GPT-2) lists it once in
    named_parameters() but twice in state_dict(): that state dict, and its torch.save file,
    serve as x*, the tied tensor read once under the parameter's name."""
    from pathgeom_fast.checkpoints import Reference

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(11, 4)
            self.mid = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 11, bias=False)
            self.head.weight = self.tok.weight

    torch.manual_seed(3)
    model, other = Tied(), Tied()
    state = other.state_dict()
    assert "head.weight" in state and "tok.weight" in state
    ref = Reference.from_state_dict(model, state)
    assert ref.names == [n for n, _ in model.named_parameters()]
    for n, t in zip(ref.names, ref.tensors):
        assert torch.equal(t, state[n]), n
    torch.save(state, tmp_path / "xstar.pt")
    from_file = Reference.from_file(model, str(tmp_path / "xstar.pt"))
    assert all(torch.equal(a, b) for a, b in zip(from_file.tensors, ref.tensors))
