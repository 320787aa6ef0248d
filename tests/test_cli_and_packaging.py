"""The `sluice` CLI, and Sluice's generic package names living beside transformers."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _sluice(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "draft-model"])
def test_generate_streams_the_same_text_as_the_api(tiny_llama_dir, speculative):
    from engine import LLM, SamplingParams

    ref = LLM(str(tiny_llama_dir), num_kv_blocks=64).generate(
        ["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    extra = ["--speculative", "draft", "--speculative-model", str(tiny_llama_dir), "--speculative-quantization",
             "int8", "--speculative-min-draft-prob", "0"] if speculative else []
    res = _sluice("generate", "The quick brown fox", "--raw", "--model", str(tiny_llama_dir),
                  "--temperature", "0", "--max-tokens", "12", *extra)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ref + "\n"


def test_chat_keeps_history_and_ends_on_eof(tiny_llama_dir):
    res = _sluice("chat", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--seed", "0", stdin="hello\nagain\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") >= 2  # one answer per turn
    assert not res.stdout.startswith(">")  # piped, stdout holds the answers alone: no input prompt


def test_bad_model_is_a_one_line_error():
    res = _sluice("generate", "hi", "--model", "some-org/some-model")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("sluice: error: unknown model")
    assert len(res.stderr.strip().splitlines()) == 1


def test_transformers_loads_models_with_sluice_installed(tiny_qwen2_dir):
    """transformers probes for a package named `kernels` (Hugging Face's); ours must not confuse it."""
    import kernels
    from transformers import AutoModelForCausalLM
    from transformers.utils.import_utils import is_kernels_available

    assert hasattr(kernels, "paged_attention")  # it is Sluice's package that is importable
    assert not is_kernels_available()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
