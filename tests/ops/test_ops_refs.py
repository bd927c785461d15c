"""`refs` as a mapping keyed by parameter name (params a module), and mapping views refused.

A safetensors file loads as a dict in sorted-key order (0, 1, 10, 11, 2, ...): a positional
list made from it pairs tensors of different layers without any error when their shapes agree.
"""

import pytest
import torch
from integ_helpers import flat
from safetensors.torch import load_file, save_file

import pathgeom_fast as pg
from pathgeom_fast.checkpoints import CheckpointError


def deep_mlp():
    torch.manual_seed(0)  # 12 equal-shaped layers: misaligned order passes every shape check
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(12)])


def fp64_stats(g, x, r):
    d = x - r
    return torch.tensor([float(g @ d), float(g @ g), float(d @ d)], dtype=torch.float64)


@pytest.fixture
def setup(tmp_path):
    model = deep_mlp()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    gen = torch.Generator().manual_seed(1)
    path = str(tmp_path / "xstar.safetensors")
    save_file({n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}, path)
    return model, path


def test_refs_mapping_matched_by_name(setup):
    model, path = setup
    state = load_file(path)
    assert list(state)[:4] == ["0.weight", "1.weight", "10.weight", "11.weight"]  # sorted, not model order
    want = fp64_stats(flat(pg.grads_of(model)), flat(model.parameters()), flat(state[n] for n, _ in model.named_parameters()))
    got = pg.secant_stats(pg.grads_of(model), model, state)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    multi = pg.secant_stats_multi([pg.grads_of(model)] * 2, model, state)
    assert torch.allclose(multi, want.expand(2, 3), rtol=1e-6, atol=0)
    # the positional list the file's order gives is a different (wrong) number: hence the refusal below
    wrong = pg.secant_stats(pg.grads_of(model), model, list(state.values()))
    assert not torch.allclose(wrong, want, rtol=1e-3)


@pytest.mark.parametrize("which", ["grads", "params", "refs"])
def test_mapping_views_are_refused(setup, which):
    model, path = setup
    state = load_file(path)
    args = {"grads": pg.grads_of(model), "params": list(model.parameters()), "refs": [state[n] for n, _ in model.named_parameters()]}
    args[which] = {"grads": {n: p.grad for n, p in model.named_parameters()}, "params": dict(model.named_parameters()), "refs": state}[which].values()
    with pytest.raises(TypeError, match=rf"{which} is a dict_values \(a view of a mapping\): its order is the mapping's"):
        pg.secant_stats(args["grads"], args["params"], args["refs"])


def test_mapping_refs_need_a_module_as_params(setup):
    model, path = setup
    with pytest.raises(TypeError, match="refs is a dict; a mapping is matched by name only when .* the module as params"):
        pg.secant_stats(pg.grads_of(model), list(model.parameters()), load_file(path))
    with pytest.raises(TypeError, match="grads is a dict"):
        pg.secant_stats({n: p.grad for n, p in model.named_parameters()}, model, load_file(path))


@pytest.mark.parametrize(
    "edit, exc, match",
    [
        (lambda s: s.pop("7.weight"), KeyError, r"lacks 1 of the model's 12 trainable parameters, first '7\.weight'"),
        (lambda s: s.__setitem__("12.weight", torch.randn(16, 16)), CheckpointError, r"not parameters or buffers of the model, first '12\.weight'"),
        (lambda s: s.__setitem__("3.weight", torch.randn(16, 8)), CheckpointError, r"'3\.weight' has shape \[16, 8\]"),
        (lambda s: s.__setitem__("3.weight", torch.ones(16, 16, dtype=torch.int64)), CheckpointError, r"'3\.weight' has dtype torch\.int64"),
        (lambda s: s.__setitem__("3.weight", 1.0), CheckpointError, r"'3\.weight' is a float, not a tensor"),
    ],
)
def test_refs_mapping_checks_name_the_key(setup, edit, exc, match):
    model, path = setup
    state = load_file(path)
    edit(state)
    with pytest.raises(exc, match=match) as info:
        pg.secant_stats(pg.grads_of(model), model, state)
    assert "refs to pg.secant_stats" in str(info.value)


def test_frozen_parameters_are_left_out_alike_by_params_grads_of_and_snapshots(tmp_path):
    """params=module means the trainable parameters, as grads_of(model) and save_snapshot take
    them: a snapshot of a model with a frozen layer, read back by name, measures that model;
    a full state dict (frozen keys included) or a module holding x* gives the same result; a
    module passed as gradients is refused."""
    from pathgeom_fast.snapshots import save_snapshot

    model = deep_mlp()
    model[0].weight.requires_grad_(False)
    model[5].weight.requires_grad_(False)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    gen = torch.Generator().manual_seed(2)
    xstar_model = deep_mlp()
    with torch.no_grad():
        for p in xstar_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    path = str(tmp_path / "xstar.safetensors")
    save_snapshot(xstar_model, path, step=100)  # all trainable there: every key
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 10 and len(pg.grads_of(model)) == 10
    xs = dict(xstar_model.named_parameters())
    want = fp64_stats(flat(p.grad for _, p in trained), flat(p for _, p in trained), flat(xs[n] for n, _ in trained))
    for refs in (load_file(path), xstar_model, {n: t for n, t in load_file(path).items() if n not in ("0.weight", "5.weight")}):
        got = pg.secant_stats(pg.grads_of(model), model, refs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert pg.numel_of(model) == 10 * 256
    # our own snapshot of the model with frozen layers holds its trainable parameters only
    save_snapshot(model, str(tmp_path / "own.safetensors"), step=3)
    assert sorted(load_file(str(tmp_path / "own.safetensors"))) == sorted(n for n, _ in trained)
    pg.secant_stats(pg.grads_of(model), model, load_file(str(tmp_path / "own.safetensors")))
    with pytest.raises(TypeError, match=r"grads is a module \(Sequential\).*grads_of\(model\)"):
        pg.secant_stats(model, model, xstar_model)
    with pytest.raises(TypeError, match=r"grads_lists is a list of 10 tensors; it must be a sequence of K gradient lists"):
        pg.secant_stats_multi(pg.grads_of(model), model, xstar_model)
    multi = pg.secant_stats_multi([pg.grads_of(model)], model, xstar_model)
    torch.testing.assert_close(multi[0], want, rtol=1e-6, atol=0)




def test_prefixed_keys_are_explained(setup):
    """A state saved from a DDP / compiled / wrapped model has prefixed keys: the error says
    which prefix to strip (or add), with the line that does it, and that line works."""
    model, path = setup
    state = load_file(path)
    prefixed = {"module." + k: v for k, v in state.items()}
    with pytest.raises(KeyError, match=r"its keys carry the prefix 'module\.': strip it") as info:
        pg.secant_stats(pg.grads_of(model), model, prefixed)
    assert "k.removeprefix('module.')" in str(info.value)
    fixed = {k.removeprefix("module."): v for k, v in prefixed.items()}
    assert torch.equal(pg.secant_stats(pg.grads_of(model), model, fixed), pg.secant_stats(pg.grads_of(model), model, state))
    wrapped = torch.nn.Sequential(model)
    with pytest.raises(KeyError, match=r"the model's names carry the prefix '0\.' that its keys lack: add it"):
        pg.secant_stats(pg.grads_of(wrapped), wrapped, state)
