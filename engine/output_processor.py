"""Turns scheduler updates into RequestOutputs: detokenize, cut stop strings, gather n > 1 samples."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import RequestUpdate


@dataclass
class _Sample:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: dict[str, _Sample]  # child request id -> its sample
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set once complete, then on every output

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput]
    stopped: dict[str, str]  # child id -> stop string that ended it (the scheduler must finish these)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.parent_of: dict[str, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            child_ids: list[str]) -> None:
        samples = {cid: _Sample(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                                logprobs=[] if params.logprobs is not None else None)
                   for i, cid in enumerate(child_ids)}
        self.parents[request_id] = _Parent(request_id, prompt, prompt_token_ids, samples)
        for cid in child_ids:
            self.parent_of[cid] = request_id

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return list(parent.samples) if parent else []

    def add_prompt_logprobs(self, completed: dict[str, list[TokenLogprob | None]]) -> None:
        """Complete prompt logprobs (child id -> entries), computed for the first sample of their parent."""
        for child_id, entries in completed.items():
            parent = self.parents.get(self.parent_of.get(child_id, ""))
            if parent is not None:
                parent.prompt_logprobs = entries

    def process(self, updates: list[RequestUpdate]) -> ProcessedStep:
        touched: dict[str, dict[str, tuple[str, list[int]]]] = {}
        stopped: dict[str, str] = {}
        for u in updates:
            parent = self.parents.get(self.parent_of.get(u.request_id, ""))
            if parent is None:
                continue
            sample = parent.samples[u.request_id]
            result = sample.detok.update(u.new_token_ids, u.finish_reason is not None, u.stopped_on_token)
            # a step that emits several tokens (speculative decoding) keeps none past a stop string
            new_ids = u.new_token_ids[:result.num_tokens]
            sample.token_ids.extend(new_ids)
            if sample.logprobs is not None and u.new_logprobs:
                sample.logprobs.extend(u.new_logprobs[:len(new_ids)])
            if result.stop_string is not None:
                stopped[u.request_id] = result.stop_string
                sample.finish_reason, sample.stop_reason = "stop", result.stop_string
            elif u.finish_reason is not None:
                sample.finish_reason, sample.stop_reason = u.finish_reason, u.stop_reason
                parent.error = parent.error or u.error
            parent.num_cached_tokens = max(parent.num_cached_tokens, u.num_cached_tokens)
            touched.setdefault(parent.request_id, {})[u.request_id] = (result.delta_text, new_ids)
        outputs = [self._output(self.parents[pid], deltas) for pid, deltas in touched.items()]
        return ProcessedStep(outputs, stopped)

    def finish(self, request_id: str, reason: str, error: str | None = None) -> RequestOutput | None:
        """End every sample of a parent that is still open (abort or error) and report it."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        parent.error = error
        deltas = {}
        for cid, sample in parent.samples.items():
            if sample.finish_reason is None:
                sample.finish_reason = reason
                deltas[cid] = ("", [])
        return self._output(parent, deltas)

    def _output(self, parent: _Parent, deltas: dict[str, tuple[str, list[int]]]) -> RequestOutput:
        completions = []
        for cid, s in parent.samples.items():
            delta_text, delta_ids = deltas.get(cid, ("", []))
            completions.append(CompletionOutput(
                index=s.index, text=s.detok.text[:s.detok.emitted], token_ids=list(s.token_ids),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                delta_text=delta_text, delta_token_ids=list(delta_ids)))
        finished = parent.finished
        if finished:
            del self.parents[parent.request_id]
            for cid in parent.samples:
                self.parent_of.pop(cid, None)
        # prompt_logprobs: the same complete list on every output once computed (vLLM's cumulative outputs),
        # which is from the first one that carries an output token: the prefill ends by that step
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions, finished,
                             parent.num_cached_tokens, parent.error, parent.prompt_logprobs)
