from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import AUTH, KEY
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    # llama3 rope scaling and untied head, so both variants are exercised
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", rope_parameters=scaling)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=True)


# The gateway tests' clients of the module's own `server` fixture (a tests.server.Server).
@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
