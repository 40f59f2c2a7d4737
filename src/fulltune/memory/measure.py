"""Measured peak memory of a run, to hold every estimate against.

CUDA: the caching allocator's peak allocated and reserved bytes.
CPU: the process's resident set, sampled every ~2 ms in a thread, minus the baseline taken before
the model loaded. glibc keeps freed memory (so RSS hides frees and overstates later peaks); we
ask it, through mallopt, to serve blocks ≥ 64 KiB with mmap and to trim the heap at once, so the
RSS follows what is really live — the same effect as MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0 in the environment, applied from inside the process. That makes every
large allocation a fresh mmap (measured: 4.5 instead of 2.5 s per quickstart step), so a run
measures only its first few steps this way and then `relax_malloc()`: fast mode, below.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_MAX = 65536  # glibc's default cap on simultaneous mmap'ed blocks
# Fast mode: no mmap at all and a 1 GiB trim threshold, so every block — the 113 MB gradient of
# SmolLM2's tied embedding included, above glibc's 32 MiB ceiling for its dynamic mmap threshold —
# is reused from the heap instead of being mapped and page-faulted in anew each step. Measured
# against the previous relaxed mode (mmap above 32 MiB) on packed quickstart steps, two rounds side
# by side: 3.08-3.27 vs 3.41-3.56 s/step in bf16-mixed, 6.22-6.23 vs 6.63-6.73 in fp32
# (docs/benchmarks.md, "Throughput of the batching modes").
FAST_TRIM_THRESHOLD = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")


# glibc's documented defaults. Setting them explicitly also turns off its dynamic mmap threshold, so
# "glibc" after a run is these values, not the untouched allocator: the closest glibc lets us return to.
GLIBC_DEFAULTS = {"mmap_max": GLIBC_MMAP_MAX, "mmap_threshold": 128 * 1024, "trim_threshold": 128 * 1024}
_settings: dict[str, int] = dict(GLIBC_DEFAULTS)  # what this process last asked glibc for (it has no getter)


def _mallopt(**settings: int) -> bool:
    codes = {"mmap_max": M_MMAP_MAX, "mmap_threshold": M_MMAP_THRESHOLD, "trim_threshold": M_TRIM_THRESHOLD}
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(bool(libc.mallopt(codes[k], v)) for k, v in settings.items())
    except (OSError, AttributeError):
        return False
    _settings.update(settings)
    return ok


def malloc_settings() -> dict[str, int]:
    """The allocator settings this process asked for last (glibc's defaults until fulltune sets any)."""
    return dict(_settings)


@contextlib.contextmanager
def malloc_restored():
    """Whatever a run asks of glibc (measuring mode, then fast mode), the caller gets its own settings
    back afterwards: a library user's process, or the next test, is not left in fast mode."""
    saved = malloc_settings()
    try:
        yield
    finally:
        if malloc_settings() != saved:
            _mallopt(**saved)


def make_malloc_honest() -> bool:
    """Tell glibc to return freed memory at once (True if it accepted)."""
    return _mallopt(mmap_max=GLIBC_MMAP_MAX, mmap_threshold=65536, trim_threshold=0)


def trim_malloc() -> None:
    """Hand every free page glibc holds back to the OS, so RSS is live memory again."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def relax_malloc() -> None:
    """Fast allocation: freed memory is kept in the heap for reuse, however large the block."""
    _mallopt(mmap_max=0, trim_threshold=FAST_TRIM_THRESHOLD)


def make_resident(model) -> None:
    """Read every weight once. safetensors weights can be file mappings that become resident only when
    first touched; the CPU memory check (runcheck) counts the weights as resident before step 1.
    Measured without it: an fp32 run with no evaluation before training over-measured by the 0.54 GB
    of SmolLM2-135M's weights (3.53 GB vs 3.01 with it)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakMeter:
    """Peak memory per named section (e.g. "train"), above a baseline taken at start()."""

    def __init__(self, device_type: str = "cpu", interval_s: float = 0.002):
        self.device_type, self.interval_s = device_type, interval_s
        self.baseline = 0
        self.sections: dict[str, int] = {}
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.honest_malloc = False
        self.active = True
        self.paused = False
        self.pre_train: int | None = None  # RSS just before the first measured step (CPU)

    def start(self) -> PeakMeter:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        self.honest_malloc = make_malloc_honest()
        trim_malloc()
        self.baseline = self._max = rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="fulltune-peak-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = rss_bytes()
            if value > self._max:
                self._max = value
            time.sleep(self.interval_s)

    @contextlib.contextmanager
    def section(self, name: str):
        """Record the peak reached inside this block under `name` (max over all entries)."""
        if not self.active:
            yield
            return
        if self.paused:
            self.resume()
        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.sections[name + "_reserved"] = max(
                self.sections.get(name + "_reserved", 0), torch.cuda.max_memory_reserved()
            )
        else:
            self._max = rss_bytes()
            yield
            peak = max(self._max, rss_bytes())
        self.sections[name] = max(self.sections.get(name, 0), peak)

    def pause(self) -> None:
        """Fast allocation while nothing is measured (e.g. evaluation before training)."""
        if self.device_type == "cpu" and self.honest_malloc and not self.paused:
            relax_malloc()
            self.paused = True

    def resume(self) -> None:
        """Measuring mode again: glibc frees at once, and what it cached meanwhile is trimmed."""
        if self.paused:
            make_malloc_honest()
            trim_malloc()
            self.paused = False
            if self.pre_train is None:
                self.pre_train = rss_bytes()

    def stop(self) -> None:
        """Stop measuring; on CPU, hand glibc its fast defaults back. Recorded peaks are kept."""
        self.active = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.honest_malloc:
            if not self.paused:
                relax_malloc()
            self.honest_malloc = self.paused = False

    def above_baseline(self, name: str) -> int:
        return self.sections.get(name, 0) - self.baseline


def state_bytes(model, optimizer) -> dict:
    """This rank's bytes of parameters, gradients and optimiser state (under FSDP2: its local shards only)."""
    import torch

    from fulltune.distributed import local, rank

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    from fulltune.optim.optimizers import device_states, state_tensor_bytes  # quantised: codes and scales

    opt = sum(
        state_tensor_bytes(local(v))
        for s in device_states(optimizer)
        for v in s.values()
        if torch.is_tensor(v) and v.ndim > 0
    )
    return {"rank": rank(), "params": params, "grads": grads, "optimizer": opt}
