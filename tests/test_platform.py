"""Process-level CPU tuning: the OpenMP worker release that keeps engine-thread steps fast."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from engine.platform import release_openmp_workers


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_release_ends_the_calling_threads_idle_openmp_workers():
    counts: dict[str, int | bool] = {}

    def body() -> None:  # a fresh thread, so its worker pool is its own and the test's other threads stay out
        torch.set_num_threads(2)
        torch.ones(1 << 22).mul_(2)  # large enough for a parallel region: the pool starts one worker
        counts["with_pool"] = _threads()
        counts["released"] = release_openmp_workers()
        counts["after"] = _threads()
        torch.ones(1 << 22).mul_(2)  # still works: the next region starts new workers
        counts["again"] = _threads()

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if not counts["released"]:
        pytest.skip("torch's OpenMP runtime here is not libgomp")
    assert counts["after"] == counts["with_pool"] - 1
    assert counts["again"] == counts["with_pool"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_offline_generate_leaves_its_thread_no_openmp_workers(tiny_llama_dir):
    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), num_kv_blocks=32, block_size=4, quantization="none")
    counts: dict[str, int] = {}

    def handler() -> None:  # as a web framework's worker thread would call it
        torch.set_num_threads(2)
        counts["before"] = _threads()
        torch.ones(1 << 22).mul_(2)  # this thread's parallel regions start a worker
        counts["with_pool"] = _threads()
        llm.generate("hello", SamplingParams(max_tokens=2))
        counts["after"] = _threads()

    worker = threading.Thread(target=handler)
    worker.start()
    worker.join()
    if counts["with_pool"] == counts["before"] or not release_openmp_workers():
        pytest.skip("no libgomp worker pool here")
    assert counts["after"] == counts["before"]
