"""Builds and caches the small C kernels of kernels/ (attention, norms, rope): compiled once with the
system C compiler into $SLUICE_HOME/kernels, keyed by a digest of source and flags, and loaded through
ctypes, which releases the GIL for each call. Without a compiler, off Linux, or with
SLUICE_CPU_KERNELS=0, `load` returns None and callers take their torch path.

Threads: the kernels use OpenMP from the libgomp torch has already loaded (same soname), so they share
torch's thread pool instead of starting a second one.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("sluice.kernels")

# no -ffast-math (the softmax relies on -inf); -fno-math-errno lets expf vectorise through libmvec
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The library built from `source`, or None where it cannot be built."""
    if os.environ.get("SLUICE_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: the CPU kernels' torch paths run instead")
        return None
    digest = hashlib.sha256((source + " ".join(FLAGS) + platform.machine()).encode()).hexdigest()[:16]
    home = Path(os.environ.get("SLUICE_HOME", Path.home() / ".cache" / "sluice"))
    target = home / "kernels" / f"{name}_{digest}.so"
    try:
        if not target.exists():
            _compile(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("CPU kernel %s unavailable (%s): using the torch path", name, exc)
        return None


def _compile(compiler: str, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{target.stem}.c", Path(tmp) / target.name
        src.write_text(source)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, target)  # atomic: a concurrent process sees the whole file or none
