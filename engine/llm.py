"""The offline API, vLLM-shaped: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat`."""
from __future__ import annotations

import itertools
from typing import Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.platform import release_openmp_workers
from engine.sampling_params import SamplingParams
from engine.tokenizer import Message, render_chat

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "smollm2", **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()
        # Loading left this thread an OpenMP worker pool; calls from another thread (a web framework's
        # thread pool) would run beside it and every kernel would be slower (engine.platform). Each call
        # lets its own go too.
        release_openmp_workers()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        # Every prompt is validated before any is queued: a bad one must not leave the others behind in the
        # engine, to be run (and their outputs dropped) by the next call.
        prepared = [self.engine.prepare_request(f"offline-{next(self._ids)}", prompt, p)
                    for prompt, p in zip(prompts, params_list)]
        for req in prepared:
            self.engine.add_prepared(req)
        return self._run([req.request_id for req in prepared], use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [render_chat(self.engine.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="requests", unit="req")
        try:
            while len(done) < len(order) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            release_openmp_workers()
        if bar is not None:
            bar.close()
        missing = [r for r in order if r not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} requests did not finish")
        return [done[r] for r in order]
