"""EAGLE-style draft head (Li et al. 2024): one decoder layer that reads the target's own features.

The row at position p is fc(concat(embed(x_{p+1}), f_p)), where f_p is the target's final normed hidden
state at p and x_{p+1} the token after p. One `DecoderLayer` (paged attention, its KV in a one-layer cache
that shares the target's block tables) and an RMSNorm turn it into g_p, a prediction of f_{p+1}; the
target's LM head on g_p, restricted to a draft vocabulary (the training data's most frequent tokens),
gives the draft for x_{p+2}. Drafting goes on autoregressively: the row at p+1 is fc(embed(d_1), g_p).

The head borrows the target's embedding, RoPE tables and LM head (never copied into its checkpoint), so
a checkpoint holds only fc, the layer, the norm and the draft vocabulary: about 4.2M fp16 weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from decoding.chain import Drafter, decode_metadata, draft_chain, rows_metadata
from decoding.proposers import FeatureBatch, Proposal
from engine.config import ModelConfig
from engine.linear import PACKERS, Linear
from engine.model import DecoderLayer, LlamaForCausalLM, RMSNorm, decode_stack
from engine.kv_cache import kv_cache_bytes_per_block
from engine.rope import apply_rope
from kernels import TORCH_BACKEND, AttentionMetadata, cpu_quant

HEADS_DIR = Path(__file__).resolve().parent / "heads"
DEFAULT_HEAD = HEADS_DIR / "smollm2-eagle.safetensors"  # trained for the default model, SmolLM2-135M-Instruct
FORMAT = "sluice-eagle"
_TRAINED = ("fc.", "layer.", "norm.")  # the head's own weights; the rest is the target's


@dataclass
class _Target:
    """The target model, held outside the module tree so its weights never enter the head's state."""

    model: LlamaForCausalLM


class EagleHead(nn.Module):
    def __init__(self, target: LlamaForCausalLM, draft_vocab: torch.Tensor):
        super().__init__()
        cfg: ModelConfig = target.config
        param = target.embed_tokens.weight
        self.config = cfg
        self._target = _Target(target)
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.layer = DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("draft_vocab", draft_vocab.to(torch.int64).to(param.device))  # [N] target ids
        # The target's LM head, restricted to the draft vocabulary; fixed, rebuilt from the target on load.
        self.draft_head = Linear(cfg.hidden_size, len(draft_vocab), bias=False)
        self.draft_head.weight_t.requires_grad_(False)
        self.to(device=param.device, dtype=param.dtype)
        self.reset_parameters()
        self.layer.self_attn.backend = target.layers[0].self_attn.backend
        self.stack = None  # the layer as one C call, once gguf packing gave it blocks (kernels/cpu_decode.py)

    @property
    def target(self) -> LlamaForCausalLM:
        return self._target.model

    @property
    def draft_vocab_size(self) -> int:
        return self.draft_vocab.numel()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith("draft_head."):
                continue
            if name.endswith("weight_t"):
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
        self.bind_lm_head()

    @torch.no_grad()
    def bind_lm_head(self) -> None:
        """Copy the target LM head's draft-vocabulary columns into `draft_head`.

        The head may already be packed into a CPU library format (its plain weight dropped), so it is
        read back by running it on the identity: I @ W^T = W^T, exactly the weights the target uses.
        """
        lm_head = self.target.lm_head
        h = self.config.hidden_size
        eye = torch.eye(h, dtype=self.fc.bias.dtype, device=self.draft_vocab.device)
        weight_t = lm_head(eye).to(eye.dtype)  # [H, V]
        self.draft_head.weight_t.data = weight_t.index_select(1, self.draft_vocab).contiguous()  # [H, N]

    def embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # ids: [T], features: [T, H] -> fc(concat(embed(ids), features)): [T, H]
        tokens = self.target.embed_tokens(ids).to(features.dtype)
        return self.fc(torch.cat([tokens, features], dim=-1))

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T]; features: [T, H] -> g: [T, H], the predicted next features
        x = self.embed(input_ids, features.to(self.fc.bias.dtype))
        rope = self.target.rope.lookup(positions, x.dtype)
        if self.stack is not None and self.stack.supports(x, rope[0], [kv_cache], meta):
            return self.norm(self.stack(x, *rope, [kv_cache], meta))
        return self.norm(self.layer(x, rope, kv_cache, meta))

    def draft_logits(self, g: torch.Tensor) -> torch.Tensor:
        # g: [..., H] -> logits over the draft vocabulary: [..., N], fp32
        return self.draft_head(g).float()

    def forward_train(self, input_ids: torch.Tensor, features: torch.Tensor, depth: int = 1) -> list[torch.Tensor]:
        """The same head over right-padded batches, with plain causal SDPA and no cache.

        input_ids: [B, S] (row p holds x_{p+1}), features: [B, S, H] (f_p). Returns g for each drafting
        depth 1..depth, each [B, S, H]. Depth 1 reads the target's features; the depth-d row at p reads
        the depth-(d-1) output at p-1 instead, and attends as the autoregressive draft step d-1 would:
        to the depth-1 rows at positions <= p-d+1 and the depth-k row at p-d+k for k = 2..d. With the
        real tokens as input ids, depth d's argmax at p is the d-th chain draft after position p-d+1
        (as long as the drafts before it were right), so one call scores chain drafting everywhere.
        """
        b, s, h = features.shape
        positions = torch.arange(s, device=features.device)
        rope = self.target.rope.lookup(positions.repeat(b), features.dtype)  # [B*S, 1, D/2]
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs: list[torch.Tensor] = []
        inputs = features
        for d in range(1, depth + 1):
            if d > 1:
                inputs = F.pad(outputs[-1][:, :-1], (0, 0, 1, 0))  # the previous depth's g, one position later
            x = self.embed(input_ids.reshape(-1), inputs.reshape(b * s, h))  # [B*S, H]
            x = x + self._attention_train(self.layer.input_layernorm(x), rope, keys, positions, b)
            x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
            outputs.append(self.norm(x).view(b, s, h))
        return outputs

    def _attention_train(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                         keys: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, b: int) -> torch.Tensor:
        # x: [B*S, H]; keys: the (k, v) of earlier depths, each [B, KVH, S, D], appended to
        attn = self.layer.self_attn
        s = positions.numel()
        nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = attn.qkv_proj(x).view(b * s, nh + 2 * nkv, hd)
        qk = apply_rope(qkv[:, :nh + nkv], *rope)
        q = qk[:, :nh].view(b, s, nh, hd).transpose(1, 2)  # [B, H, S, D]
        k = qk[:, nh:].view(b, s, nkv, hd).transpose(1, 2)  # [B, KVH, S, D]
        v = qkv[:, nh + nkv:].view(b, s, nkv, hd).transpose(1, 2)
        keys.append((k, v))
        depth = len(keys)
        if depth == 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale, enable_gqa=True)
        else:
            qp, kp = positions[:, None], positions[None, :]
            # [S, depth*S]: the real rows up to p-d+1, then one row of each later depth on the diagonal
            mask = torch.cat([kp <= qp - (depth - 1)] + [kp == qp - (depth - j) for j in range(2, depth + 1)], dim=1)
            k_all = torch.cat([kk for kk, _ in keys], dim=2)
            v_all = torch.cat([vv for _, vv in keys], dim=2)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=attn.scale, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(b * s, nh * hd))

    def pack_linears(self, quantization: str) -> None:
        """The target's CPU weight format (engine/linear.py) for the head's projections too; inference only.

        With gguf the head's weights become Q8_0 blocks (ggml's rounding, ~0.4% per weight), so drafting
        runs on the same fast kernels as the target. Drafts need no exactness: verification keeps the
        output the target's own, and the rounding barely moves which tokens the head proposes.
        """
        if self.fc.bias.device.type != "cpu" or self.fc.bias.dtype != torch.float32:
            return
        if quantization == "none" and not torch.backends.mkldnn.is_available():
            return
        for module in self.modules():
            if not isinstance(module, Linear):
                continue
            if quantization == "gguf" and module.weight_t.shape[0] % cpu_quant.BLOCK == 0 and cpu_quant.available():
                blocks = cpu_quant.quantize_q8_0(module.weight_t.detach().t())
                with torch.no_grad():
                    module.weight_t.copy_(cpu_quant.dequantize(blocks, "q8_0").t())
                module.pack_gguf("q8_0", blocks)
            else:
                PACKERS[quantization](module)
        gguf = quantization == "gguf" and self.layer.self_attn.backend is TORCH_BACKEND
        self.stack = decode_stack([self.layer], self.config) if gguf else None

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(_TRAINED)}


class EagleProposer:
    """`FeatureProposer` over an `EagleHead`: extends the draft's KV with the step's rows, then drafts
    up to k tokens per proposing request, one batched decode call per draft after the first.

    As in EAGLE-2, a request stops drafting once the product of the head's confidences in its drafts
    falls below `min_draft_prob`: each draft costs a head step and a verification row, and a draft that
    is unlikely to be reached and accepted costs more time than it is expected to save.
    """

    name = "eagle"

    def __init__(self, head: EagleHead, num_speculative_tokens: int = 4, seed: int = 0,
                 min_draft_prob: float = 0.0):
        self.head = head
        self.num_speculative_tokens = num_speculative_tokens
        self.min_draft_prob = min_draft_prob
        self.seed = seed
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.generator: torch.Generator | None = None

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        cfg = self.head.config
        return kv_cache_bytes_per_block(cfg, block_size, dtype) // cfg.num_layers  # one layer's

    def allocate_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = self.head.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, as the target's: padded decode rows read masked slots, and 0 * NaN would poison them
        self.kv_cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    @torch.inference_mode()
    def propose_from_features(self, batch: FeatureBatch) -> dict[str, Proposal]:
        assert self.kv_cache is not None, "allocate_cache first"
        head, bs = self.head, batch.block_size
        dev = batch.hidden.device
        starts = batch.starts
        block_tables = batch.block_tables.to(dev)
        meta = rows_metadata(block_tables, starts, batch.positions, batch.seq_lens, bs)
        g = head(batch.next_token_ids, batch.hidden, batch.positions, self.kv_cache, meta)  # [T, H]
        want = [r for r in range(len(starts) - 1) if batch.propose[r] and starts[r + 1] > starts[r]
                and min(self.num_speculative_tokens, batch.max_drafts[r]) > 0]
        if not want:
            return {}
        g = g[torch.tensor([starts[r + 1] - 1 for r in want], device=dev)]  # [P, H] each request's last row
        last = [batch.seq_lens[r] - 1 for r in want]  # position of each request's last row

        def advance(drafts: torch.Tensor, g: torch.Tensor, active: list[int]) -> torch.Tensor:
            # one decode row per request still drafting, fed its last draft and g, one position on
            for a in active:
                last[a] += 1
            positions = torch.tensor([last[a] for a in active], device=dev)
            tables = block_tables[torch.tensor([want[a] for a in active], device=dev)]
            return head(drafts, g, positions, self.kv_cache, decode_metadata(tables, positions, bs))  # [P', H]

        drafter = Drafter(head.draft_logits, advance, head.draft_vocab, head.config.vocab_size)
        return draft_chain(drafter, g, [batch.request_ids[r] for r in want],
                           [min(self.num_speculative_tokens, batch.max_drafts[r]) for r in want],
                           [batch.temperatures[r] for r in want], self.min_draft_prob, self.generator)


# --- checkpoints -------------------------------------------------------------------------------------


def _fingerprint(cfg: ModelConfig) -> dict[str, str]:
    """What a head must agree on with its target."""
    return {"hidden_size": str(cfg.hidden_size), "vocab_size": str(cfg.vocab_size),
            "num_heads": str(cfg.num_heads), "num_kv_heads": str(cfg.num_kv_heads),
            "intermediate_size": str(cfg.intermediate_size)}


def save_eagle(head: EagleHead, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """fp16 weights + draft vocabulary in one safetensors file; metadata values are strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in head.trained_state().items()}
    tensors["draft_vocab"] = head.draft_vocab.detach().cpu()
    meta = {"format": FORMAT, "draft_vocab_size": str(head.draft_vocab_size), **_fingerprint(head.config),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_eagle_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_eagle(path: str | Path, target_model: LlamaForCausalLM, quantization: str | None = None) -> EagleHead:
    """A head for `target_model` from a checkpoint written by `save_eagle`, in the target's dtype and device.

    quantization: the target's resolved CPU weight format ("none", "fp16", "int8", "gguf"; LoadedModel.quantization)
    to pack the head's projections into as well; None keeps plain weights (training, tests).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EAGLE head at {path}")
    meta = read_eagle_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Sluice EAGLE head (format {meta.get('format')!r})")
    want = _fingerprint(target_model.config)
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"EAGLE head {path.name} was trained for another model: (head, target) {json.dumps(wrong)}")
    tensors = load_file(str(path))
    head = EagleHead(target_model, tensors.pop("draft_vocab"))
    dtype = head.fc.bias.dtype
    missing, unexpected = head.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if k.startswith(_TRAINED)]
    if missing or unexpected:
        raise ValueError(f"EAGLE head {path.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    head.eval().requires_grad_(False)
    if quantization is not None:
        head.pack_linears(quantization)
    return head
