r"""Timing, peak memory and a small progress bar.

Timing
------
One *step* is a forward pass plus ``torch.autograd.grad`` of the loss with
respect to every input that requires grad (forward only for losses without a
gradient, e.g. ``sinkhorn_knopp``).  After ``warmup`` untimed steps, steps are
repeated until both ``min_repeats`` and ``min_time`` are reached (or
``max_repeats``/``max_time``).  CUDA steps are timed with CUDA events; CPU steps
with ``time.perf_counter``.  Reported: median, quartiles (IQR), min and max.

Peak memory
-----------
The extra memory one step needs on top of what exists before it (inputs):

* CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()`` around the
  step, after ``reset_peak_memory_stats``: bytes held by tensors through the
  caching allocator (not its reserved-but-free cache).
* CPU: the same quantity read from ``torch.profiler`` with
  ``profile_memory=True``: the running sum of the CPU allocator's allocation and
  free events during the step, its maximum taken.  It counts tensors allocated
  through torch's CPU allocator (everything ATen and the C++ extension
  allocate as tensors) on the threads the profiler follows; it does not
  count memory that bypasses it (Python objects, a kernel's private
  ``malloc``, the Triton interpreter's NumPy buffers) nor tensors allocated
  on threads other than the caller's (e.g. a kernel's OpenMP workers).  Peak RSS was not used: glibc keeps freed blocks for reuse, so a
  warm process's RSS high-water mark under-reports a step's allocations.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .cases import Impl, Inputs

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before the step (tensor bytes)",
    "cpu": "torch.profiler(profile_memory=True): peak of the running sum of CPU allocator "
           "allocations minus frees during the step (tensor bytes; excludes non-tensor memory)",
}


def make_step(impl: Impl, inp: Inputs) -> Callable[[], None]:
    """A closure running one forward+backward of ``impl`` on ``inp``."""
    leaves = inp.leaves() if inp.differentiable else []

    def step():
        out = impl.run(inp)
        if leaves:
            loss = out if out.dim() == 0 else out.sum()
            torch.autograd.grad(loss, leaves)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float
    q25: float
    q75: float
    min: float
    max: float
    repeats: int

    def as_dict(self):
        return asdict(self)


def _quantile(sorted_vals, q):
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times) -> Timing:
    s = sorted(times)
    return Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], s[-1], len(s))


def time_step(step: Callable[[], None], device: torch.device, *, warmup: int = 1, min_repeats: int = 3,
              max_repeats: int = 50, min_time: float = 0.2, max_time: float = 5.0) -> Timing:
    """Seconds per step (see module docstring)."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    start = time.perf_counter()
    while True:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        n = len(times)
        if n >= max_repeats or (n >= min_repeats and spent >= min_time) or (n >= 1 and spent >= max_time):
            break
    return summarize(times)


class _QuietStderr:
    """Silence fd 2 (the profiler's C++ logging) for the duration of a block."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _QuietStderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        finally:
            os.remove(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: e.get("ts", 0))
    running, peak = 0, 0
    for e in mem:
        running += int(e["args"].get("Bytes", 0))
        peak = max(peak, running)
    return peak


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensor storages made by ATen ops while the mode is active, and the largest single
    storage (any device; for processes whose allocator the profiler does not see, e.g. distributed ranks).
    ``with LiveBytes() as mb: step()`` then ``mb.peak``, ``mb.largest``."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or key in self.seen:
                    continue
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
                weakref.finalize(t, self._free, key, nbytes)
        return out


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak extra bytes of one step over what is allocated before it (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_bytes(step)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure (CUDA or CPU allocator)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg
        or isinstance(exc, MemoryError))


def free_memory(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def unrunnable(exc: BaseException, device) -> "str | None":
    """Why ``exc`` means a benchmark point cannot run here (out of memory), or None
    when it is a real failure to report.  Frees cached memory after an out-of-memory."""
    if is_oom(exc):
        free_memory(device)
        return "out of memory"
    return None


class ProgressBar:
    """A one-line progress bar on stderr (no dependency).

    On a terminal the line is redrawn in place; otherwise (logs, pipes) a line
    is written each time another tenth of the work is done, so logs stay short.
    """

    def __init__(self, total: int, *, label: str = "", stream=None, width: int = 28, enabled: bool = True):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._last_tenth = -1

    def render(self, note: str = "") -> str:
        frac = min(self.done / self.total, 1.0)
        fill = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_s = "?" if eta != eta else f"{eta:4.0f}s"
        head = f"{self.label} " if self.label else ""
        return (f"{head}[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{frac * 100:3.0f}% {elapsed:4.0f}s elapsed, eta {eta_s}" + (f"  {note}" if note else ""))

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.render(note))
            self.stream.flush()
        else:
            tenth = int(10 * self.done / self.total)
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(self.render(note) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
