"""`sluice` on bad input: one line of `error:`, never a traceback, and before the model loads where it can be."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from gateway.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
# A model that does not exist: an error about anything else proves the check ran before the model loaded.
NO_MODEL = ["--model", "/nonexistent/model"]
QUICK = ["--quantization", "none"]  # no packing progress bar on stderr


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code in (1, 2), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(r"sluice( \w+)?: error: ", err) and expected in err, err


@pytest.mark.parametrize("argv, expected", [
    (["--block-size", "0"], "--block-size: must be a positive integer"),  # was a ZeroDivisionError traceback
    (["--max-num-seqs", "0"], "--max-num-seqs: must be a positive integer"),  # was a 32-token context
    (["--max-model-len", "0"], "--max-model-len: must be a positive integer"),  # was ignored
    (["--kv-cache-memory", "0"], "size must be at least one byte"),  # was ignored
    (["--kv-cache-memory=-1G"], "size must be at least one byte"),
    (["--kv-cache-memory", "abc"], "'abc' is not a size"),
    (["--kv-cache-memory", "100T"], "more than the"),  # T was no unit; then the pool would not fit
    (["--dtype", "bogus"], "invalid choice: 'bogus'"),  # was an AttributeError traceback
    (["--kv-cache-dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "tpu"], "unsupported device 'tpu'"),
    (["--speculative", "draft"], "needs a draft model"),  # was found after the model loaded
    (["--speculative-model", "x"], "is for speculative 'eagle' or 'draft'"),  # was silently unused
    (["--speculative-min-draft-prob", "2"], "speculative_min_draft_prob must be in [0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be at least 1"),
])
def test_bad_generate_options_fail_before_the_model_loads(capsys, argv, expected):
    _assert_one_line_error(*_run(capsys, ["generate", "hi", *NO_MODEL, *argv]), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    _assert_one_line_error(*_run(capsys, ["generate", "hi", "--device", "cuda", *NO_MODEL]), "no CUDA GPU")


def test_bad_serve_options_fail_before_the_model_loads(capsys):
    _assert_one_line_error(*_run(capsys, ["serve", "--port", "99999", *NO_MODEL]), "--port must be in")
    _assert_one_line_error(*_run(capsys, ["serve", "--api-key", "", *NO_MODEL]), "--api-key must not be empty")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _assert_one_line_error(*_run(capsys, ["serve", "--port", port, *NO_MODEL]), f"cannot listen on 127.0.0.1:{port}")


def _folder(tmp_path: Path, src: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("case, expected", [
    ("corrupt.gguf", "corrupt.gguf is not a readable GGUF file"),
    ("config {}", "config.json has no 'num_attention_heads'"),  # was a KeyError traceback
    ("config not JSON", "config.json is not valid JSON"),
    ("no tokenizer", "tokenizer"),  # transformers' message spans five lines
])
def test_broken_model_files_are_one_line_errors(capsys, tmp_path, tiny_llama_dir, case, expected):
    model = tmp_path / case
    if case.endswith(".gguf"):
        model.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    else:
        model.mkdir()
        _folder(model, tiny_llama_dir, "config.json", "model.safetensors")
        if case != "no tokenizer":
            (model / "config.json").write_text("{}" if case == "config {}" else "not json")
    _assert_one_line_error(*_run(capsys, ["generate", "hi", "--model", str(model), *QUICK]), expected)


def test_unwritable_sluice_home_names_it(capsys, tmp_path, monkeypatch):
    home = tmp_path / "a-file"
    home.write_text("")
    monkeypatch.setenv("SLUICE_HOME", str(home / "sluice"))  # under a file: nothing can be created there
    _assert_one_line_error(*_run(capsys, ["generate", "hi"]), f"cannot write the model cache under {home}")


def test_max_model_len_beyond_the_model_or_the_kv_cache(capsys, tiny_llama_dir):
    model = ["generate", "hi", "--model", str(tiny_llama_dir), *QUICK, "--max-tokens", "2"]  # context: 512 tokens
    _assert_one_line_error(*_run(capsys, [*model, "--max-model-len", "1000"]), "more than the model's context (512")
    _assert_one_line_error(*_run(capsys, [*model, "--max-model-len", "500", "--kv-cache-memory", "64K"]),
                           "raise --kv-cache-memory or lower --max-model-len")


def test_bf16_on_cpu_runs_with_the_default_quantization(capsys, tiny_llama_dir):
    # auto picked fp16 packing, which needs fp32 weights: "fp16 weights are a CPU fp32 feature"
    argv = ["generate", "hi", "--model", str(tiny_llama_dir), "--dtype", "bf16", "--max-tokens", "2"]
    code, err = _run(capsys, argv)
    assert code == 0, err


def test_chat_survives_a_turn_that_fails(capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 600 + "\nhello\n"))  # the first is over 512 tokens
    code, err = _run(capsys, ["chat", "--model", str(tiny_llama_dir), *QUICK, "--max-tokens", "3", "--seed", "0"])
    assert code == 0, err
    assert "sluice: error: the prompt has" in err and "/reset clears the history" in err


def test_readme_documents_every_option_and_only_real_ones():
    text = (ROOT / "README.md").read_text().split("## Benchmarks")[0]  # benchmarks/ scripts have their own
    readme = set(re.findall(r"--[a-z][a-z-]+", text))
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public way
    options = {name: {o for a in p._actions for o in a.option_strings if o.startswith("--")}
               for name, p in commands.items()}
    assert readme <= set().union(*options.values())
    assert options["generate"] | options["chat"] | options["serve"] <= readme


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_logs_its_address_and_ctrl_c_exits_with_0(tiny_llama_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--model",
                             str(tiny_llama_dir), "--kv-cache-memory", "16M"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err  # was 130: uvicorn re-raised SIGINT as KeyboardInterrupt
    assert "Traceback" not in err
    assert re.search(rf"Serving \S+ at http://127.0.0.1:{port} \(KV cache: \d+ blocks = \d+ tokens", err), err


class _ClosedPipe(io.StringIO):
    """stdout after its reader went away (`sluice generate ... | head -c 1`)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        return self.fd


def test_generate_into_a_closed_pipe_stops_quietly(capsys, monkeypatch, tiny_llama_dir):
    fd = os.open(os.devnull, os.O_WRONLY)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe(fd))
    try:
        code = main(["generate", "hi", "--model", str(tiny_llama_dir), *QUICK, "--max-tokens", "2"])
    finally:
        os.close(fd)
    assert code == 141  # was a BrokenPipeError traceback
    assert "Traceback" not in capsys.readouterr().err
