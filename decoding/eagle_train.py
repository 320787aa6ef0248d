"""Train an EAGLE draft head for a Sluice model: `sluice train-eagle --model smollm2 --out PATH`.

1. prompts: decoding/eagle_prompts.py (templates x topics, written here), and with --self-written-prompts
   user turns the target writes itself (decoding/eagle_data.py);
2. responses: Sluice's own offline API generates them (exact fp32 weights), some greedy, some sampled;
3. features: one target forward per sequence gives the final normed hidden states, as the runner sees them;
4. training with teacher forcing (EAGLE): CE of the draft logits at p against x_{p+2} over the draft
   vocabulary + w * SmoothL1(g_p, f_{p+1}), with noise on the input features; unrolled over `depth`
   drafting steps (the depth-d input feature is the head's own output, as when it drafts);
5. held-out acceptance: chain drafting with k drafts on greedy held-out answers, scored against the
   target's own greedy tokens: mean accepted length = 1 + accepted drafts per target step.

The shipped head (decoding/heads/smollm2-eagle.safetensors) came from one H100 run, about 4 minutes:

    sluice train-eagle --device cuda --out decoding/heads/smollm2-eagle.safetensors --prompts 870 --heldout 100 \
        --samples-per-prompt 5 --greedy-fraction 1 --max-num-seqs 512 --generate-seconds 110 --epochs 25 --lr 2e-3

(4,350 answers, 634k answer tokens; lr/noise/feature weight picked on 30 of the held-out prompts, scored on
the other 70: mean accepted length 2.52 at k = 4, per-draft acceptance 0.64 0.65 0.70 0.73). It runs on CPU
too (the default device), far slower; the defaults (300 prompts x 1 answer, 10 epochs) give a weaker head.

That head fits its templates: mean accepted length 3.8 on unseen fills of them, but 1.66 on user turns the
model wrote itself and 1.77 on benchmarks/spec.py's chat prompts. Fine-tuning it on CPU for 2 epochs
(12 min) over 1,000 self-written turns (177k answer tokens; `--init` the shipped head, lr 5e-4) raised
the former to 1.84 and the latter only to 1.80, so it was not shipped: a GPU run on many more
self-written turns is the way to a head for open-ended chat.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from decoding.eagle import DEFAULT_HEAD, EagleHead, load_eagle, save_eagle
from decoding.eagle_data import Sample, TrainingData, collect_data

IGNORE = -100


@dataclass
class TrainConfig:
    model: str = "smollm2"
    out: Path = DEFAULT_HEAD
    device: str = "cpu"
    num_prompts: int = 300  # training prompts; held-out prompts come on top
    heldout_prompts: int = 40  # answered greedily, scored only
    self_written_prompts: int = 0  # user turns the target writes itself (decoding/eagle_data.py), on top
    init: Path | None = None  # fine-tune this head (and keep its draft vocabulary) instead of a fresh one
    samples_per_prompt: int = 1
    greedy_fraction: float = 1.0  # prompts whose first answer is greedy; the others are sampled at `temperature`
    temperature: float = 0.7
    max_tokens: int = 200
    epochs: int = 10
    draft_vocab_size: int = 8192
    num_speculative_tokens: int = 4  # k of the acceptance report, stored in the checkpoint
    depth: int = 3  # drafting steps unrolled in training
    depth_decay: float = 0.7  # loss weight of step d is decay^(d-1)
    feature_weight: float = 1.0  # w of the SmoothL1 feature loss
    noise: float = 0.02  # std of the input feature noise, relative to the features' RMS
    lr: float = 2e-3
    batch_tokens: int = 8192  # B x S per training batch
    max_num_seqs: int = 64
    generate_seconds: float | None = None  # no new training answers are started after this long
    seed: int = 0
    progress: bool = True


@dataclass
class Acceptance:
    mean_accepted_length: float  # tokens per target step: 1 + accepted drafts
    rates: list[float]  # P(draft j accepted | drafts before it accepted), j = 1..k
    steps: int


@dataclass
class TrainResult:
    path: Path
    acceptance: Acceptance
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# --- data -----------------------------------------------------------------------------------------


def build_draft_vocab(samples: list[Sample], vocab_size: int, size: int, always: set[int]) -> torch.Tensor:
    """The `size` tokens answers use most (prompt tokens break ties), plus `always` (EOS). Sorted ids."""
    size = min(size, vocab_size)
    answer, prompt = torch.zeros(vocab_size, dtype=torch.float64), torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        ids = torch.tensor(s.token_ids)
        answer += torch.bincount(ids[s.prompt_len:], minlength=vocab_size).double()
        prompt += torch.bincount(ids[:s.prompt_len], minlength=vocab_size).double()
    score = answer * (prompt.sum() + 1) + prompt
    score[list(always)] = float("inf")
    return score.topk(size).indices.sort().values


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]: x_{p+1} at row p
    features: torch.Tensor  # [B, S, H]: f_p
    next_features: torch.Tensor  # [B, S, H]: f_{p+1}
    targets: torch.Tensor  # [B, S]: draft-vocabulary index of x_{p+2}, or IGNORE
    mask: torch.Tensor  # [B, S] bool: rows that count in the loss (the answer's drafting positions)


def make_batches(samples: list[Sample], features: list[torch.Tensor], vocab_index: torch.Tensor,
                 batch_tokens: int, device: torch.device) -> list[Batch]:
    """Length-sorted, right-padded batches of about batch_tokens rows (B x S) each."""
    return [_pad(samples, features, group, vocab_index, device) for group in _groups(samples, batch_tokens)]


def _groups(samples: list[Sample], batch_tokens: int) -> list[list[int]]:
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].token_ids))
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * (len(samples[i].token_ids) - 1) > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _pad(samples: list[Sample], features: list[torch.Tensor], group: list[int], vocab_index: torch.Tensor,
         device: torch.device) -> Batch:
    s_max = max(len(samples[i].token_ids) for i in group) - 1
    h = features[group[0]].shape[1]
    b = len(group)
    ids = torch.zeros(b, s_max, dtype=torch.int64)
    targets = torch.full((b, s_max), IGNORE, dtype=torch.int64)
    mask = torch.zeros(b, s_max, dtype=torch.bool)
    feats = torch.zeros(b, s_max, h)
    next_feats = torch.zeros(b, s_max, h)
    for row, i in enumerate(group):
        x = torch.tensor(samples[i].token_ids)
        f = features[i].float().cpu()  # [L, H]
        n = len(x) - 1  # rows p = 0 .. L-2 have x_{p+1} and f_{p+1}
        ids[row, :n] = x[1:]
        feats[row, :n] = f[:-1]
        next_feats[row, :n] = f[1:]
        targets[row, :n - 1] = vocab_index[x[2:]]
        # Drafting starts at the prompt's last row (its next token is the first one the target samples).
        mask[row, max(samples[i].prompt_len - 1, 0):n] = True
    return Batch(ids.to(device), feats.to(device), next_feats.to(device), targets.to(device), mask.to(device))


# --- training ---------------------------------------------------------------------------------------


def batch_loss(head: EagleHead, batch: Batch, cfg: TrainConfig, rms: float) -> tuple[torch.Tensor, float]:
    """Teacher-forced EAGLE loss over the unrolled drafting steps; also depth-1 top-1 accuracy."""
    feats = batch.features
    if cfg.noise > 0:
        feats = feats + torch.randn_like(feats) * (cfg.noise * rms)
    outs = head.forward_train(batch.input_ids, feats, depth=cfg.depth)
    targets = batch.targets[batch.mask]
    total = feats.new_zeros(())
    accuracy = 0.0
    for d, g in enumerate(outs):
        g = g[batch.mask]  # [M, H]
        logits = head.draft_logits(g)
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE)
        reg = F.smooth_l1_loss(g.float(), batch.next_features[batch.mask])
        total = total + cfg.depth_decay ** d * (ce + cfg.feature_weight * reg)
        if d == 0:
            valid = targets != IGNORE
            accuracy = float((logits.argmax(-1)[valid] == targets[valid]).float().mean())
    return total, accuracy


def train_head(head: EagleHead, batches: list[Batch], cfg: TrainConfig) -> list[float]:
    """AdamW with linear warm-up and a cosine decay; returns the mean loss of each epoch."""
    from tqdm import tqdm

    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = cfg.epochs * len(batches)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    sq = sum(float(b.features[b.mask].pow(2).sum()) for b in batches)
    rows = sum(int(b.mask.sum()) for b in batches) * head.config.hidden_size
    rms = math.sqrt(sq / max(rows, 1))
    rng = random.Random(cfg.seed)
    head.train()
    epoch_losses = []
    bar = tqdm(total=total, desc="training", unit="batch", disable=not cfg.progress)
    for _ in range(cfg.epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        losses = []
        for i in order:
            loss, acc = batch_loss(head, batches[i], cfg, rms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", top1=f"{acc:.3f}")
        epoch_losses.append(sum(losses) / len(losses))
    bar.close()
    head.eval()
    return epoch_losses


# --- held-out acceptance ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_acceptance(head: EagleHead, samples: list[Sample], features: list[torch.Tensor], k: int,
                        batch_tokens: int = 8192) -> Acceptance:
    """Chain drafting with k drafts per target step, greedy, on answers the target wrote greedily.

    From each step's last real row, draft j is the argmax of the depth-j training forward at the row
    j - 1 later (exact while the drafts before it were right, which is all acceptance looks at); the
    target accepts the drafts that equal its own next tokens and adds one token of its own.
    """
    dev = head.fc.bias.device
    vocab_index = torch.full((head.config.vocab_size,), IGNORE, dtype=torch.int64)  # no loss targets needed
    emitted = steps = 0
    tried, accepted = [0] * k, [0] * k
    for group in _groups(samples, batch_tokens):
        batch = _pad(samples, features, group, vocab_index, dev)
        outs = head.forward_train(batch.input_ids, batch.features, depth=k)
        preds = torch.stack([head.draft_vocab[head.draft_logits(g).argmax(-1)] for g in outs]).tolist()  # [k][B][S]
        for row, i in enumerate(group):
            x, n = samples[i].token_ids, samples[i].prompt_len  # x[n]: the token the target just sampled
            while n < len(x) - 1:
                kmax = min(k, len(x) - 1 - n)
                acc = 0
                while acc < kmax:
                    tried[acc] += 1
                    # draft acc+1 is depth acc+1 at row n-1+acc, which guesses token n+acc+1
                    if preds[acc][row][n - 1 + acc] != x[n + acc + 1]:
                        break
                    accepted[acc] += 1
                    acc += 1
                steps += 1
                emitted += min(acc + 1, len(x) - 1 - n)
                n += acc + 1
    rates = [a / t if t else 0.0 for a, t in zip(accepted, tried)]
    return Acceptance(emitted / max(steps, 1), rates, steps)


# --- the whole pipeline ------------------------------------------------------------------------------------


def fit_head(cfg: TrainConfig, data: TrainingData, samples: list[Sample] | None = None,
             features: list[torch.Tensor] | None = None) -> tuple[EagleHead, list[float]]:
    """A head (fresh, or `cfg.init` fine-tuned) trained on `samples` (default: all training data)."""
    samples = data.train if samples is None else samples
    features = data.train_features if features is None else features
    model = data.model
    torch.manual_seed(cfg.seed)
    if cfg.init is not None:
        head = load_eagle(cfg.init, model)
        for name, p in head.named_parameters():
            p.requires_grad_(not name.startswith("draft_head."))  # the target's LM head stays fixed
        draft_vocab = head.draft_vocab.cpu()
    else:
        draft_vocab = build_draft_vocab(samples, model.config.vocab_size, cfg.draft_vocab_size, data.eos_token_ids)
        head = EagleHead(model, draft_vocab)
    vocab_index = torch.full((model.config.vocab_size,), IGNORE, dtype=torch.int64)
    vocab_index[draft_vocab.cpu()] = torch.arange(len(draft_vocab))
    batches = make_batches(samples, features, vocab_index, cfg.batch_tokens, model.embed_tokens.weight.device)
    return head, train_head(head, batches, cfg)


def save_trained(head: EagleHead, cfg: TrainConfig, data: TrainingData, acceptance: Acceptance) -> Path:
    answer_tokens = sum(len(s.token_ids) - s.prompt_len for s in data.train)
    target = Path(cfg.model).name if Path(cfg.model).exists() else cfg.model
    return save_eagle(head, cfg.out, {
        "target": target, "num_speculative_tokens": cfg.num_speculative_tokens,
        "mean_accepted_length": f"{acceptance.mean_accepted_length:.3f}",
        "acceptance_rates": ",".join(f"{r:.3f}" for r in acceptance.rates),
        "train_sequences": len(data.train), "train_answer_tokens": answer_tokens,
        "heldout_sequences": len(data.heldout), "epochs": cfg.epochs, "depth": cfg.depth, "lr": cfg.lr,
    })


def train_eagle(cfg: TrainConfig) -> TrainResult:
    data = collect_data(cfg)
    t0 = time.perf_counter()
    head, losses = fit_head(cfg, data)
    data.seconds["train"] = time.perf_counter() - t0
    acceptance = evaluate_acceptance(head, data.heldout, data.heldout_features, cfg.num_speculative_tokens)
    return TrainResult(save_trained(head, cfg, data, acceptance), acceptance, losses, data.seconds)
