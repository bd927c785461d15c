"""Workers for the torch.distributed.checkpoint tests (spawned by dist_workers.launch, gloo on CPU),
and the small model and data they train, importable as ``checkpoint_workers:mlp`` and
``checkpoint_workers:data`` by ``pathgeom analyze`` (the tests put this folder on the path)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def mlp() -> torch.nn.Module:
    """The same initial weights on every rank and in every process."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(40, 6, generator=gen) * 2, torch.randint(0, 3, (40,), generator=gen)


def fsdp2_dcp_run(rank: int, world: int, out: str) -> None:
    """Train the MLP sharded with FSDP2 and save ``{"model": state_dict, "step": step}`` with
    torch.distributed.checkpoint at steps 0, 2, 4, 6 (each rank writes its shards). Rank 0 also
    keeps the full parameters it saved, for the tests' independent recomputation; then check that
    pathgeom reads the checkpoints into the sharded model slice by slice."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pathgeom_fast.checkpoints import open_run

    model = mlp()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    X, Y = data()
    saved = {}
    for step in range(7):
        if step % 2 == 0:
            dcp.save({"model": model.state_dict(), "step": step}, checkpoint_id=os.path.join(out, f"step_{step}"))
            saved[step] = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        b = slice(8 * (step % 5), 8 * (step % 5) + 8)
        torch.nn.functional.cross_entropy(model(X[b]), Y[b]).backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(saved, os.path.join(out, "..", "saved_full.pt"))
    dist.barrier()

    # pathgeom reads them back into a fresh sharded model, each rank only its slices
    run = open_run(out)
    assert [c.step for c in run] == [0, 2, 4, 6] and run.format == "dcp", run
    fresh = mlp()
    for layer in fresh:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    ref = run.checkpoints[-1].reference(fresh, name="xstar")
    for n, t in zip(ref.names, ref.tensors):
        assert t.to_local().numel() < t.numel(), (n, t.to_local().shape)  # held sharded
        assert torch.equal(t.full_tensor(), saved[6][n]), n
    match = run.checkpoints[1].load_into(fresh)
    assert match.prefix == ("model.", "")
    for n, p in fresh.named_parameters():
        assert torch.equal(p.full_tensor(), saved[2][n]), n
