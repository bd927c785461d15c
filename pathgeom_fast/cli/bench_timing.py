"""Timing and memory of ``pathgeom bench``: one call timed (CUDA events or perf_counter),
calls timed round-robin for their medians, the progress bar, and the peak extra memory of a
call (CUDA allocator peak; CPU peak resident set, with glibc's mmap threshold pinned). The
cache flush that runs before each timed CPU call stays in :mod:`.bench` with the cache size it
reads.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, args, device) -> float:
    """Seconds of one fn(*args). CUDA: events; CPU: perf_counter."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def time_interleaved(calls: dict[str, tuple[Callable, tuple]], device, repeats: int,
                     flush: Callable[[], None] | None = None, budget_s: float = 0.0,
                     max_samples: int = 41, progress=None) -> dict[str, float]:
    """Median seconds of each call, timed round-robin (one call of each per round, after a
    warm-up round) so that the noise of a shared machine falls on all of them alike;
    ``flush()``, if given, runs untimed before each call (see :class:`CacheFlush`).

    Each call is timed ``repeats`` times, or more where that fits in ``budget_s`` seconds (by
    its warm-up time), up to ``max_samples``: the later rounds hold only the fast calls (the
    probe and the fused op), which still alternate, so that their ratio is not left to the
    median of five samples on a noisy machine. ``progress`` (a :class:`Progress`) counts the
    timed calls."""
    samples = {}
    for k, (fn, args) in calls.items():
        t = time_once(fn, args, device)
        samples[k] = max(repeats, min(max_samples, int(budget_s / max(t, 1e-9))))
    _sync(device)
    if progress is not None:
        progress.add(sum(samples.values()))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for j in range(max(samples.values(), default=0)):
        for k, (fn, args) in calls.items():
            if j >= samples[k]:
                continue
            if flush is not None:
                flush()
            times[k].append(time_once(fn, args, device))
            if progress is not None:
                progress.step()
    return {k: statistics.median(v) for k, v in times.items()}


class Progress:
    """A tqdm bar on stderr over the bench's steps (inputs, checks, timed calls, memory), whose
    total grows as the steps become known; a no-op with ``enabled=False`` or without tqdm."""

    def __init__(self, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=0, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False,
                            bar_format="{desc}: {n}/{total} steps [{elapsed}]")

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_mmap_threshold() -> None:
    """Make glibc serve every allocation of 64 KiB or more with fresh pages (mmap), so that
    the peak resident set shows each call's temporaries instead of reused heap pages. Used
    only for the memory pass, after the timings."""
    libc = _libc()
    try:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except AttributeError:
        pass


def _trim_heap() -> None:
    """Give the free heap pages back (glibc malloc_trim), so that a call reusing heap memory
    freed by an earlier call faults fresh pages in and its temporaries count."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass


def peak_extra_bytes(fn, args, device) -> int | None:
    """Peak memory allocated by one call beyond what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(*args)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
        before = _status("VmRSS")
        fn(*args)
        return max(0, _status("VmHWM") - before)
    except OSError:
        return None
