"""Process-level tuning for CPU inference."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger("sluice.platform")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_OMP_PAUSE_SOFT = 1


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def tune_cpu_allocator() -> bool:
    """Keep glibc from mmap-ing (and the kernel from zero-filling) every large activation tensor.

    By default glibc serves allocations above a (dynamic) threshold with a fresh mmap and unmaps
    them on free, so each decode step page-faults through its multi-MB temporaries. Measured here,
    a 32-stream decode step of the default model went from 365 ms to 162 ms with this. Idempotent;
    a no-op (False) where glibc is not the allocator.
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1  # 32 MiB: glibc's maximum
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except AttributeError:
        log.debug("mallopt unavailable; keeping the default allocator settings")
        return False


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask for transparent huge pages under a long-lived CPU tensor (the KV pool); advice only.

    Attention jumps between KV blocks all over the pool: with 4 KiB pages most of those jumps are TLB
    misses. Call it before the tensor's pages are first written (THP is "madvise" mode on many hosts).
    """
    if tensor.device.type != "cpu":
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    begin = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    end = (start + size) // _HUGE_PAGE * _HUGE_PAGE
    libc = _libc()
    if libc is None or end <= begin:
        return
    try:
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(begin, end - begin, _MADV_HUGEPAGE)  # a refusal changes nothing
    except AttributeError:
        log.debug("madvise unavailable")


def release_openmp_workers() -> bool:
    """Let the calling thread's idle OpenMP workers exit; its next parallel region starts new ones.

    libgomp keeps one worker pool per thread that has run a parallel region, and while it manages
    more threads than there are CPUs it stops spinning waiting workers: they sleep on a futex between
    regions and each of the step's hundreds of kernels pays for waking them. A server loads the model
    on its event-loop thread and steps it on the engine thread, so the loader's idle pool alone tips
    a 2-core box over: a 32-stream decode step went from ~110 ms to ~150 ms. Returns False (nothing
    done) where torch's OpenMP runtime is not libgomp.
    """
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # torch's, already loaded; never a second one
        return gomp.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
    except (OSError, AttributeError):
        return False


def available_memory(device: str) -> int:
    """Bytes free for the KV cache on this device: a GPU's free memory, or the host's MemAvailable."""
    if torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
