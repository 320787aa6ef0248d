"""The synchronous engine: add requests, then `step()`: schedule -> execute -> update -> outputs."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from decoding.proposers import FeatureProposer, NgramProposer, Proposer
from engine.block_manager import BlockManager
from grammar import CompiledGrammar
from engine.config import EngineConfig
from engine.loader import LoadedModel, load_model
from engine.model import LlamaForCausalLM
from engine.kv_cache import kv_cache_bytes_per_block, resolve_kv_cache_dtype
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.platform import available_memory
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.stats import SchedulerStats
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import encode_prompt, eos_token_ids, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("sluice.engine")
# CPU decoding is compute-bound long before 2 GiB of KV (about 45k tokens of the default model) fill up.
_CPU_DEFAULT_KV_BYTES = 2 << 30


@dataclass
class PreparedRequest:
    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    grammar: CompiledGrammar | None = None  # compiled off the step loop, by whoever prepared it


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model, config.device, config.dtype, config.quantization)
        self.model_config = self.loaded.config
        self.tokenizer = load_tokenizer(self.loaded.source)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.loaded.source, self.loaded.hf_config)
        model_len, wanted = self.model_config.max_position_embeddings, config.max_model_len
        if wanted and wanted > model_len:  # as vLLM: positions past the model's were never trained
            raise ValueError(f"max_model_len (--max-model-len) {wanted} is more than the model's context "
                             f"({model_len} tokens)")
        param = next(self.loaded.model.parameters())
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, param.dtype, self.loaded.quantization,
                                                     param.device)
        proposer = make_proposer(config, self.loaded, self.tokenizer)
        num_blocks = self._num_blocks(proposer)
        if wanted and wanted > num_blocks * config.block_size:  # a request could never be given its blocks
            raise ValueError(f"the KV cache holds {num_blocks * config.block_size} tokens, less than max_model_len "
                             f"{wanted}: raise --kv-cache-memory or lower --max-model-len")
        self.max_model_len = min(wanted or model_len, num_blocks * config.block_size)
        log.info("KV cache: %d blocks = %d tokens (block size %d, %s)", num_blocks, num_blocks * config.block_size,
                 config.block_size, str(self.kv_cache_dtype).removeprefix("torch."))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        lookahead = proposer.num_speculative_tokens if isinstance(proposer, FeatureProposer) else 0
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   max(config.max_num_batched_tokens, 1), self.eos_token_ids, lookahead)
        self.runner = ModelRunner(self.loaded.model, num_blocks, config.block_size, proposer,
                                  speculative_max_batch(config), self.kv_cache_dtype)
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                                  config.grammar_backend, config.grammar_timeout_s)

    def _num_blocks(self, proposer: Proposer | FeatureProposer | None) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        dtype = next(self.loaded.model.parameters()).dtype
        per_block = kv_cache_bytes_per_block(self.model_config, cfg.block_size, self.kv_cache_dtype)
        if isinstance(proposer, FeatureProposer):  # its cache has a block for each of the target's
            per_block += proposer.kv_cache_bytes_per_block(cfg.block_size, dtype)
        budget = cfg.kv_cache_memory or int(available_memory(cfg.device) * cfg.kv_cache_memory_fraction)
        if cfg.kv_cache_memory is None and torch.device(cfg.device).type == "cpu":
            budget = min(budget, _CPU_DEFAULT_KV_BYTES)
        # no point in more than every sequence at full length
        ceiling = cfg.max_num_seqs * -(-(cfg.max_model_len or self.model_config.max_position_embeddings) // cfg.block_size)
        return max(2, min(budget // per_block, ceiling))

    # ---- requests in ----
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority))

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                        priority: int = 0) -> PreparedRequest:
        """Tokenize and validate; touches no engine state, so any thread may call it."""
        text = prompt if isinstance(prompt, str) else None
        token_ids = encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params)
        grammar = self.structured.compile(params.structured_output) if params.structured_output else None
        return PreparedRequest(request_id, text, token_ids, params, priority, grammar)

    def add_prepared(self, req: PreparedRequest) -> None:
        """Queue a prepared request; only the thread that steps the engine may call it."""
        params = req.params
        child_ids = [req.request_id] if params.n == 1 else [f"{req.request_id}#{i}" for i in range(params.n)]
        # an n > 1 request's samples are "id#i": those must not clash with another request's ids either
        if req.request_id in self.outputs.parents or any(c in self.outputs.parent_of for c in child_ids):
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.outputs.add(req.request_id, req.prompt, req.token_ids, params, child_ids)
        if params.prompt_logprobs is not None:  # the samples share the prompt: the first computes them, once
            self.runner.prompt_logprobs.add(child_ids[0], params.prompt_logprobs, req.token_ids)
        for i, child_id in enumerate(child_ids):
            child_params = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None)  # the others may read the prefix cache
            leader = child_ids[0] if i > 0 else None
            matcher = req.grammar.matcher() if req.grammar is not None else None
            self.scheduler.add_request(Request(child_id, req.token_ids, child_params, self.max_model_len,
                                               req.priority, prefix_leader=leader, matcher=matcher))

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= int(t) < vocab for t in params.logit_bias or ()):  # vLLM refuses them too
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        n_prompt, limit = len(token_ids), self.max_model_len
        if n_prompt >= limit:
            raise ValueError(f"the prompt has {n_prompt} tokens; this model's context is {limit} tokens")
        if params.max_tokens is not None and n_prompt + params.max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but {n_prompt} prompt tokens "
                             f"+ max_tokens {params.max_tokens} = {n_prompt + params.max_tokens}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus, error: str | None = None) -> RequestOutput | None:
        """End every open sample of a request now (blocks go back) and give its final output; None if unknown."""
        for child_id in self.outputs.child_ids(request_id):
            self.scheduler.finish(child_id, status)
            # Only this ends a request before its prompt logprobs are complete (they are by its first token).
            # Dropped now, not with the runner's finished ids next step: by then the id may be in use again.
            self.runner.prompt_logprobs.discard(child_id)
        return self.outputs.finish(request_id, status.value, error)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        try:
            sched.grammar, failed = self.structured.bitmask(sched, self.scheduler.requests)
            result = self.runner.execute(sched)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
            log.exception("step failed")
            return self._fail(dict.fromkeys((s.request_id for s in sched.scheduled), f"{type(exc).__name__}: {exc}"))
        self.outputs.add_prompt_logprobs(result.prompt_logprobs)  # before the first output token's RequestOutput
        # Requests that failed alone (their grammar, their logits processor) end before the update, which
        # then skips them: the rest of the batch goes on.
        failed_outputs = self._fail({**failed, **result.errors})
        updates = self.scheduler.update(sched, result.sampled, result.logprobs, result.drafts)
        processed = self.outputs.process(updates)
        for child_id, stop in processed.stopped.items():
            self.scheduler.finish(child_id, RequestStatus.FINISHED_STOPPED, stop)
        return failed_outputs + processed.outputs

    def _fail(self, errors: dict[str, str]) -> list[RequestOutput]:
        """Fail the requests of these samples (child id -> error), all samples of each."""
        parents = {self.outputs.parent_of[c]: e for c, e in errors.items() if c in self.outputs.parent_of}
        if parents:
            log.warning("failing %d requests: %s", len(parents), "; ".join(set(parents.values())))
        outs = [self.finish_request(p, RequestStatus.FINISHED_ERROR, e) for p, e in parents.items()]
        return [o for o in outs if o is not None]

    def stats(self) -> SchedulerStats:
        return dataclasses.replace(self.scheduler.stats(), spec_draft_seconds=self.runner.draft_seconds,
                                   step_seconds=self.runner.step_seconds)


def speculative_max_batch(config: EngineConfig) -> int:
    """Measured on the 2-core CPU (benchmarks/spec.py): verifying drafts adds rows to a compute-bound step,
    so at batch 2-4 EAGLE ran 0.6-0.8x and n-gram 0.84-1.06x of plain decoding; a GPU step is memory-bound
    and has room for them."""
    if config.speculative_max_batch is not None:
        return config.speculative_max_batch
    return 1 if torch.device(config.device).type == "cpu" else 4


def make_proposer(config: EngineConfig, target: LoadedModel,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> Proposer | FeatureProposer | None:
    if config.speculative == "none":
        return None
    if config.speculative == "ngram":
        return NgramProposer(config.num_speculative_tokens)
    if config.speculative == "eagle":
        from decoding.eagle import DEFAULT_HEAD, EagleProposer, load_eagle

        try:
            head = load_eagle(config.speculative_model or DEFAULT_HEAD, target.model, target.quantization)
        except ValueError as exc:
            if config.speculative_model:
                raise
            raise ValueError("the EAGLE head shipped with Sluice fits the default model (smollm2) only; train one "
                             "for this model (sluice train-eagle --model MODEL --out HEAD) and pass it as "
                             f"--speculative-model HEAD ({exc})") from None
        return EagleProposer(head, config.num_speculative_tokens, min_draft_prob=config.speculative_min_draft_prob)
    if config.speculative == "draft":
        from decoding.draft_model import DraftModelProposer

        return DraftModelProposer(load_draft_model(config, target, tokenizer), config.num_speculative_tokens,
                                  min_draft_prob=config.speculative_min_draft_prob)
    raise ValueError(f"unknown speculative method {config.speculative!r}: expected none, ngram, eagle or draft")


def load_draft_model(config: EngineConfig, target: LoadedModel,
                     tokenizer: PreTrainedTokenizerBase | None) -> LlamaForCausalLM:
    """The draft model named by speculative_model, on the target's device; it must share the target's tokenizer."""
    if not config.speculative_model:
        raise ValueError("--speculative draft needs a draft model: --speculative-model NAME_OR_PATH")
    draft = load_model(config.speculative_model, config.device, config.dtype,
                       config.speculative_quantization or config.quantization)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} ids) is not the target's "
                         f"({target.config.vocab_size})")
    if tokenizer is not None and load_tokenizer(draft.source).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the draft model {config.speculative_model!r} has another tokenizer than the target")
    return draft.model
