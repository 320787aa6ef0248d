"""Draft-model speculation: a separate, smaller model with the target's tokenizer drafts by plain decoding.

The draft model keeps its own paged KV cache, level with the target's: it has a block wherever the target
has one (same ids, same block tables), and each step it runs over the tokens the target just made valid
(prompt chunk, decoded token, accepted drafts) plus, for a request that wants drafts, the token the target
just sampled; its logits there give the first draft. Rejected drafts need no rollback: their positions are
written again when the target gets there.
"""
from __future__ import annotations

import torch

from decoding.chain import Drafter, decode_metadata, draft_chain, rows_metadata
from decoding.proposers import FeatureBatch, Proposal
from engine.model import LlamaForCausalLM
from engine.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block


class DraftModelProposer:
    """`FeatureProposer` over a draft `LlamaForCausalLM` (vLLM's "draft model" method)."""

    name = "draft"

    def __init__(self, model: LlamaForCausalLM, num_speculative_tokens: int = 4, seed: int = 0,
                 min_draft_prob: float = 0.0):
        self.model = model
        self.num_speculative_tokens = num_speculative_tokens
        self.min_draft_prob = min_draft_prob
        self.seed = seed
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.generator: torch.Generator | None = None
        param = model.embed_tokens.weight
        self.dtype = param.dtype  # its KV's, whatever the target's is
        self.vocab = torch.arange(model.config.vocab_size, device=param.device)  # drafts over the whole vocabulary

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return kv_cache_bytes_per_block(self.model.config, block_size, self.dtype)

    def allocate_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.kv_caches = allocate_kv_caches(self.model.config, num_blocks, block_size, self.dtype, device)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    @torch.inference_mode()
    def propose_from_features(self, batch: FeatureBatch) -> dict[str, Proposal]:
        assert self.kv_caches, "allocate_cache first"
        bs, dev, starts = batch.block_size, batch.token_ids.device, batch.starts
        want = [r for r in range(len(starts) - 1) if batch.propose[r] and starts[r + 1] > starts[r]
                and min(self.num_speculative_tokens, batch.max_drafts[r]) > 0]
        wanting = set(want)
        tokens, positions, nexts = batch.token_ids.tolist(), batch.positions.tolist(), batch.next_token_ids.tolist()
        ids: list[int] = []
        pos: list[int] = []
        fed_starts, lens = [0], []
        for r in range(len(starts) - 1):
            a, b = starts[r], starts[r + 1]
            ids += tokens[a:b]
            pos += positions[a:b]
            if r in wanting:  # the token sampled after the rows: the first draft comes from its logits
                ids.append(nexts[b - 1])
                pos.append(positions[b - 1] + 1)
            fed_starts.append(len(ids))
            lens.append(batch.seq_lens[r] + (r in wanting))
        block_tables = batch.block_tables.to(dev)
        positions_t = torch.tensor(pos, device=dev)
        meta = rows_metadata(block_tables, fed_starts, positions_t, lens, bs)
        hidden = self.model(torch.tensor(ids, device=dev), positions_t, self.kv_caches, meta)  # [T', H]
        if not want:
            return {}
        states = hidden[torch.tensor([fed_starts[r + 1] - 1 for r in want], device=dev)]  # [P, H]
        last = [lens[r] - 1 for r in want]  # each request's last fed position

        def advance(drafts: torch.Tensor, _states: torch.Tensor, active: list[int]) -> torch.Tensor:
            # the draft model needs only its last draft: its KV holds the rest
            for a in active:
                last[a] += 1
            at = torch.tensor([last[a] for a in active], device=dev)
            tables = block_tables[torch.tensor([want[a] for a in active], device=dev)]
            return self.model(drafts, at, self.kv_caches, decode_metadata(tables, at, bs))  # [P', H]

        drafter = Drafter(self.model.compute_logits, advance, self.vocab, self.model.config.vocab_size)
        return draft_chain(drafter, states, [batch.request_ids[r] for r in want],
                           [min(self.num_speculative_tokens, batch.max_drafts[r]) for r in want],
                           [batch.temperatures[r] for r in want], self.min_draft_prob, self.generator)
