"""Worker functions for tests/ops/test_distributed.py (spawned processes, gloo on CPU)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist


def launch(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` processes; re-raise the first failure."""
    import tempfile

    import torch.multiprocessing as mp

    # file:// rendezvous: no TCP port to pick (and lose to another process) beforehand
    init = "file://" + os.path.join(tempfile.mkdtemp(prefix="pg-dist-"), "rendezvous")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, init, errors, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if msgs:
        raise AssertionError("\n".join(msgs))
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"workers exited with {bad}")


def _entry(fn, rank, world, init, errors, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()  # nobody tears down while a peer is still communicating
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        os._exit(1)  # no teardown: peers may be blocked in a collective with us
    # Skip interpreter shutdown: destructors of gloo's C++ threads there have aborted a worker
    # ("terminate called without an active exception") after all its work had passed.
    os._exit(0)


def close(out, ref, rel=1e-6, what=""):
    out, ref = out.double().cpu(), ref.double().cpu()
    tol = rel * torch.sqrt(ref[..., 1] * ref[..., 2]) + 1e-300
    ok = bool(((out[..., 0] - ref[..., 0]).abs() <= tol).all()) and torch.allclose(out[..., 1:], ref[..., 1:], rtol=rel, atol=0)
    assert ok, f"{what}: {out.tolist()} vs {ref.tolist()}"


def gram_close(out, ref, rel=1e-6, what=""):
    """|G - G_ref| <= rel * sqrt(G_ii G_jj), and exactly symmetric."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diag = torch.diagonal(ref, dim1=-2, dim2=-1)
    ok = bool(((out - ref).abs() <= rel * torch.sqrt(diag[..., :, None] * diag[..., None, :]) + 1e-300).all())
    assert ok and torch.equal(out, out.transpose(-1, -2)), f"{what}: {out.tolist()} vs {ref.tolist()}"


def full_lists(shapes, seed=0, K=1):
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(s, generator=gen) for s in shapes]
    r = [torch.randn(s, generator=gen) for s in shapes]
    g = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(K)]
    return g, x, r


def count_collectives(fn):
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        out = fn()
    return out, comm.get_total_counts()


# ------------------------------------------------------------------------------------------


def dtensor_1d(rank, world):
    import pathgeom_fast as pg
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(7, 3), (1, 5), (10,), (3, 4), (64, 33), (2, 9)]
    places = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()], [Shard(1)], [Shard(1)]]  # uneven, empty shards
    grads, x, r = full_lists(shapes, seed=1, K=3)
    dt = lambda ts: [distribute_tensor(t, mesh, p) for t, p in zip(ts, places)]
    gd, xd, rd = [dt(g) for g in grads], dt(x), dt(r)
    if rank == world - 1:
        assert gd[0][1].to_local().numel() == 0  # an empty local shard
    ref = pg.reference_secant_stats(grads[0], x, r)
    out, n = count_collectives(lambda: pg.secant_stats(gd[0], xd, rd))
    close(out, ref, what="total")
    assert n == 1, f"{n} collectives"
    out, n = count_collectives(lambda: pg.secant_stats(gd[0], xd, rd, per_tensor=True))
    close(out, pg.reference_secant_stats(grads[0], x, r, per_tensor=True), what="per tensor")
    assert n == 1, f"{n} collectives"
    out, n = count_collectives(lambda: pg.secant_stats_multi(gd, xd, rd, weight_decay=0.1))
    ref = torch.stack([pg.reference_secant_stats(g, x, r, weight_decay=0.1) for g in grads])
    close(out, ref, what="multi")
    assert n == 1, f"{n} collectives"
    out, n = count_collectives(lambda: pg.secant_stats_multi(gd, xd, rd, per_tensor=True))
    ref = torch.stack([pg.reference_secant_stats(g, x, r, per_tensor=True) for g in grads])
    close(out, ref, what="multi per tensor")
    assert n == 1
    out, n = count_collectives(lambda: pg.secant_gram(gd, xd, rd))
    gram_close(out, pg.reference_secant_gram(grads, x, r), what="gram")
    assert n == 1, f"{n} collectives"
    out, n = count_collectives(lambda: pg.secant_gram(gd[:2], xd, rd, per_tensor=True))
    gram_close(out, pg.reference_secant_gram(grads[:2], x, r, per_tensor=True), what="gram per tensor")
    assert n == 1, f"{n} collectives"
    try:
        pg.secant_gram([[gd[0][0]], [gd[1][1]]], [xd[0]], [rd[0]])
    except ValueError as e:
        assert "index 0: vecs[1][0] has shape [1, 5]" in str(e), e
    else:
        raise AssertionError("mismatched shards were accepted")
    # bad mixes
    try:
        pg.secant_stats(gd[0], x, rd)
    except ValueError as e:
        assert "params[0] is a plain tensor" in str(e) or "is a DTensor but params[0]" in str(e), e
    else:
        raise AssertionError("mixing DTensors and plain tensors was accepted")
    p = torch.distributed.tensor.DTensor.from_local(torch.ones(3, 4), mesh, [Partial()], run_check=False)
    try:
        pg.secant_stats([gd[0][3]], [p], [rd[3]])
    except ValueError as e:
        assert "Partial placement" in str(e), e
    else:
        raise AssertionError("a Partial placement was accepted")
    try:
        pg.secant_stats([gd[0][0]], [xd[0]], [rd[1]])
    except ValueError as e:
        assert "index 0: refs[0] has shape [1, 5]" in str(e), e
    else:
        raise AssertionError("mismatched shards were accepted")


def plain_group(rank, world):
    import pathgeom_fast as pg

    grads, x, r = full_lists([(1000,), (37,), (5,)], seed=2, K=2)
    # ZeRO-style flat partitions: rank k holds an uneven slice of every flattened tensor
    def cuts(n):  # uneven, monotonic, some ranks empty for short tensors
        c = [0]
        for k in range(1, world):
            c.append(max(c[-1], min(n, round(n * k / world) + (3 if k % 2 else 0))))
        return c + [n]

    loc = lambda ts: [t[cuts(t.numel())[rank] : cuts(t.numel())[rank + 1]] for t in ts]
    out, n = count_collectives(lambda: pg.secant_stats(loc(grads[0]), loc(x), loc(r), group=dist.group.WORLD))
    close(out, pg.reference_secant_stats(grads[0], x, r), what="group total")
    assert n == 1
    out, n = count_collectives(lambda: pg.secant_stats_multi([loc(g) for g in grads], loc(x), loc(r), per_tensor=True, group=dist.group.WORLD))
    close(out, torch.stack([pg.reference_secant_stats(g, x, r, per_tensor=True) for g in grads]), what="group multi")
    assert n == 1
    out, n = count_collectives(lambda: pg.secant_gram([loc(g) for g in grads], loc(x), loc(r), group=dist.group.WORLD))
    gram_close(out, pg.reference_secant_gram(grads, x, r), what="group gram")
    assert n == 1


def dtensor_2d(rank, world):
    import pathgeom_fast as pg
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    cases = {
        "hsdp": [[Replicate(), Shard(0)]] * 3,
        "tp2d": [[Shard(0), Shard(1)], [Shard(1), Shard(0)], [Shard(0), Shard(1)]],
        "mixed": [[Replicate(), Shard(0)], [Shard(0), Replicate()], [Replicate(), Replicate()]],
    }
    shapes = [(9, 7), (5, 3), (4, 6)]
    grads, x, r = full_lists(shapes, seed=3)
    for name, places in cases.items():
        dt = lambda ts: [distribute_tensor(t, mesh, p) for t, p in zip(ts, places)]
        out, n = count_collectives(lambda: pg.secant_stats(dt(grads[0]), dt(x), dt(r), per_tensor=True))
        close(out, pg.reference_secant_stats(grads[0], x, r, per_tensor=True), what=name)
        # distribute_tensor itself communicates: count only our call
        gd, xd, rd = dt(grads[0]), dt(x), dt(r)
        out, n = count_collectives(lambda: pg.secant_stats(gd, xd, rd))
        close(out, pg.reference_secant_stats(grads[0], x, r), what=name)
        assert n == 1, (name, n)
        out, n = count_collectives(lambda: pg.secant_gram([gd, xd], xd, rd, per_tensor=True))
        gram_close(out, pg.reference_secant_gram([grads[0], x], x, r, per_tensor=True), what=name + " gram")
        assert n == 1, (name, n)


def fsdp_tracker(rank, world, tmpdir):
    """An FSDP2 model's per-step rows equal the single-process rows of the same run."""
    import pathgeom_fast  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pathgeom_fast.snapshots import save_snapshot
    from pathgeom_fast.tracker import PathTracker, Reference

    torch.manual_seed(0)
    X, Y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))

    def train(model, tracker=None, steps=5):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if tracker is not None:
            tracker = tracker(model, opt)
        for s in range(steps):
            b = (X[s * 8 : s * 8 + 8], Y[s * 8 : s * 8 + 8])
            loss = loss_fn(model, b)
            loss.backward()
            if tracker is not None:
                with tracker.step(s, loss):
                    opt.step()
            else:
                opt.step()
            opt.zero_grad()
        return tracker

    # x*: a run of 8 steps, saved by rank 0 (single process)
    torch.manual_seed(1)
    m0 = make()
    train(m0, steps=8)
    path = os.path.join(tmpdir, "xstar.safetensors")
    if rank == 0:
        save_snapshot(m0, path, 8)
    dist.barrier()

    torch.manual_seed(1)
    single = make()
    t_single = train(single, lambda m, o: PathTracker(m, Reference.from_file(m, path), o))

    torch.manual_seed(1)
    sharded = make()
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ref = Reference.from_file(sharded, path)
    assert all(t.to_local().numel() < t.numel() or t.numel() < world for t in ref.tensors)  # held sharded
    t_sharded = train(sharded, lambda m, o: PathTracker(m, ref, o))
    assert t_sharded.update_mode == "momentum"
    assert len(t_single.records) == len(t_sharded.records) == 10
    for a, b in zip(t_single.records, t_sharded.records):
        assert (a["step"], a["kind"]) == (b["step"], b["kind"])
        for key in ("a", "b", "c"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a, b)

    # post-hoc analysis of snapshots, sharded, equals the single-process analysis
    from pathgeom_fast.snapshots import SnapshotRecorder, analyze_snapshots

    snaps = os.path.join(tmpdir, "snaps")
    torch.manual_seed(1)
    m1 = make()
    rec = SnapshotRecorder(m1, snaps, every=2) if rank == 0 else None
    opt = torch.optim.SGD(m1.parameters(), lr=0.1)
    for s in range(5):
        if rec:
            rec.maybe_save(s)
        loss_fn(m1, (X[s * 8 : s * 8 + 8], Y[s * 8 : s * 8 + 8])).backward()
        opt.step()
        opt.zero_grad()
    dist.barrier()
    probes = [(X[:16], Y[:16]), (X[16:32], Y[16:32])]
    full = [(X[:40], Y[:40]), (X[40:], Y[40:])]
    single_rows, _ = analyze_snapshots(snaps, make(), loss_fn, probes, full, progress=False)
    sharded2 = make()
    for layer in sharded2:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded2, mesh=mesh)
    sharded_rows, _ = analyze_snapshots(snaps, sharded2, loss_fn, probes, full, progress=False)
    assert len(single_rows) == len(sharded_rows) == 2 * 3  # snapshots 0, 2 (4 is the reference) x (2 probes, full)
    for a, b in zip(single_rows, sharded_rows):
        assert (a["step"], a["kind"], a["sample"]) == (b["step"], b["kind"], b["sample"])
        for key in ("a", "b", "c"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a, b)
