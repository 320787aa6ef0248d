"""Training data for EAGLE heads, all made by Sluice itself: user turns, the target's answers, its features.

User turns come from two places: the templates of decoding/eagle_prompts.py, and the target itself.
Templates alone teach a head the answers to templates: the shipped head trained on them reached a mean
accepted length of 3.8 on their held-out fills but 1.8 on other chat. So the target also writes user
turns (as in Magpie, Xu et al. 2024): given its chat template up to where a user message begins, an
instruction-tuned model samples a plausible request, different every time, and then answers it.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from decoding.chain import rows_metadata
from decoding.eagle_prompts import chat_prompts
from engine.model import LlamaForCausalLM
from engine.tokenizer import Message, render_chat

if TYPE_CHECKING:
    from decoding.eagle_train import TrainConfig

SELF_WRITTEN_SYSTEMS = [None, None, "You are a helpful assistant.", "You are a concise assistant.",
                        "You are a friendly teacher.", "You are an expert software engineer."]
_MARK = "\x00USER\x00"  # stands in for the user's text while the template is rendered


@dataclass
class Sample:
    token_ids: list[int]  # prompt + answer
    prompt_len: int
    greedy: bool


def user_turn_prefix(tokenizer, system: str | None) -> str:
    """The chat template rendered up to the point where the user's message text begins."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    text = render_chat(tokenizer, messages + [{"role": "user", "content": _MARK}], add_generation_prompt=False)
    return text[:text.index(_MARK)]


def self_written_conversations(llm, n: int, seed: int = 0, max_tokens: int = 96,
                               progress: bool = False) -> list[list[Message]]:
    """Up to n distinct one-turn conversations whose user message the target sampled itself (T = 1).

    Turns cut off at max_tokens or shorter than 8 characters are dropped, so a few more are asked for.
    """
    from engine.sampling_params import SamplingParams

    tokenizer = llm.get_tokenizer()
    rng = random.Random(seed)
    systems = [rng.choice(SELF_WRITTEN_SYSTEMS) for _ in range(n + n // 2)]
    prefixes = [user_turn_prefix(tokenizer, s) for s in systems]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=seed)
    per_turn = [dataclasses.replace(params, seed=seed + i) for i in range(len(prefixes))]  # distinct samples
    outs = llm.generate(prefixes, per_turn, use_tqdm=progress)
    seen: set[str] = set()
    conversations = []
    for system, out in zip(systems, outs):
        text = out.outputs[0].text.strip()
        if out.outputs[0].finish_reason != "stop" or len(text) < 8 or text in seen:
            continue
        seen.add(text)
        conv: list[Message] = [{"role": "system", "content": system}] if system else []
        conversations.append(conv + [{"role": "user", "content": text}])
    return conversations[:n]


def generate_samples(llm, conversations: list[list[dict]], cfg: TrainConfig, greedy_only: bool = False,
                     budget_s: float | None = None) -> list[Sample]:
    """Answers from Sluice itself. With several samples per prompt, at most the first is greedy.

    Requests go in chunks of a few engine batches; none is started after `budget_s` seconds.
    """
    from engine.sampling_params import SamplingParams

    rng = random.Random(cfg.seed)
    jobs = []
    for conv in conversations:
        for s in range(1 if greedy_only else cfg.samples_per_prompt):
            g = greedy_only or (s == 0 and rng.random() < cfg.greedy_fraction)
            params = (SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0) if g else
                      SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=0.95))
            jobs.append((conv, params, g))
    rng.shuffle(jobs)  # mixed lengths in every chunk
    start, samples = time.perf_counter(), []
    chunk = 4 * cfg.max_num_seqs
    for i in range(0, len(jobs), chunk):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        part = jobs[i:i + chunk]
        outs = llm.chat([c for c, _, _ in part], [p for _, p, _ in part], use_tqdm=cfg.progress)
        samples += [Sample(list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids), g)
                    for o, (_, _, g) in zip(outs, part)]
    return samples


@torch.inference_mode()
def target_features(model: LlamaForCausalLM, sequences: list[list[int]], max_batch_tokens: int = 16384,
                    block_size: int = 16, progress: bool = False) -> list[torch.Tensor]:
    """The target's final normed hidden states at every position, [L, H] per sequence: what the runner
    hands a feature proposer. Whole sequences through the paged model, several per forward."""
    from tqdm import tqdm

    cfg = model.config
    param = model.embed_tokens.weight
    dev, dtype = param.device, param.dtype
    max_len = max(len(s) for s in sequences)
    cap = max(max_batch_tokens, max_len)
    num_blocks = cap // block_size + len(sequences) + 1
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
              for _ in range(cfg.num_layers)]
    out: list[torch.Tensor] = []
    batches, current, tokens = [], [], 0
    for seq in sequences:
        if current and tokens + len(seq) > cap:
            batches.append(current)
            current, tokens = [], 0
        current.append(seq)
        tokens += len(seq)
    batches.append(current)
    for batch in tqdm(batches, desc="target features", unit="batch", disable=not progress):
        lens = [len(s) for s in batch]
        tables, next_block = [], 0
        for n in lens:
            nb = -(-n // block_size)
            tables.append(list(range(next_block, next_block + nb)))
            next_block += nb
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        meta = rows_metadata(block_tables, starts, positions, lens, block_size)
        ids = torch.tensor([t for s in batch for t in s], device=dev)
        hidden = model(ids, positions, caches, meta).float()  # [T, H]
        out += list(hidden.split(lens))
    return out


@dataclass
class TrainingData:
    model: LlamaForCausalLM
    train: list[Sample]
    train_features: list[torch.Tensor]
    heldout: list[Sample]
    heldout_features: list[torch.Tensor]
    eos_token_ids: set[int]
    seconds: dict[str, float]


def collect_data(cfg: TrainConfig) -> TrainingData:
    """Prompts -> answers (Sluice, fp32) -> the target's features of every sequence."""
    from engine import LLM

    torch.manual_seed(cfg.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    max_len = cfg.max_tokens + 256  # chat prompts here are short
    llm = LLM(model=cfg.model, device=cfg.device, dtype="fp32", quantization="none", max_num_seqs=cfg.max_num_seqs,
              max_num_batched_tokens=max(2048, cfg.max_num_seqs * 16),
              num_kv_blocks=cfg.max_num_seqs * (-(-max_len // 16)) + 64)
    engine = llm.engine
    conversations = chat_prompts(cfg.num_prompts + cfg.heldout_prompts, cfg.seed)
    train_convs, heldout_convs = conversations[:cfg.num_prompts], conversations[cfg.num_prompts:]
    if cfg.self_written_prompts:
        written = self_written_conversations(llm, cfg.self_written_prompts + cfg.heldout_prompts, cfg.seed,
                                             progress=cfg.progress)
        train_convs += written[cfg.heldout_prompts:]
        heldout_convs += written[:cfg.heldout_prompts]
    heldout = generate_samples(llm, heldout_convs, cfg, greedy_only=True)
    train = generate_samples(llm, train_convs, cfg, budget_s=cfg.generate_seconds)
    seconds["generate"] = time.perf_counter() - t0
    model = engine.loaded.model
    eos = set(engine.eos_token_ids) | set(model.config.eos_token_ids)
    del llm, engine  # the KV cache

    t0 = time.perf_counter()
    train_feats = target_features(model, [s.token_ids for s in train], progress=cfg.progress)
    heldout_feats = target_features(model, [s.token_ids for s in heldout], progress=cfg.progress)
    seconds["features"] = time.perf_counter() - t0
    return TrainingData(model, train, train_feats, heldout, heldout_feats, eos, seconds)
