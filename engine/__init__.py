"""Sluice's engine: model, paged KV cache bookkeeping, scheduler, runner, and the offline `LLM` API."""
from engine.config import EngineConfig, ModelConfig
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy: importing SamplingParams must not load torch-heavy modules or the model loader.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
