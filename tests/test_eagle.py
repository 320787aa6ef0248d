"""EAGLE draft head: the paged propose path against the training forward, sampling, checkpoints, training."""
from __future__ import annotations

import pytest
import torch

from decoding.eagle import EagleHead, EagleProposer, load_eagle, read_eagle_metadata, save_eagle
from decoding.eagle_data import Sample, TrainingData, self_written_conversations, target_features, user_turn_prefix
from decoding.eagle_train import (IGNORE, TrainConfig, build_draft_vocab, evaluate_acceptance, fit_head,
                                  make_batches, train_head)
from decoding.proposers import FeatureBatch
from engine.loader import load_model
from tests.helpers import CountingStack

BLOCK = 4
K = 3


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), "cpu", "auto", "none").model


def _head(target, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    v = target.config.vocab_size
    head = EagleHead(target, torch.randperm(v)[: v // 2])  # a draft vocabulary of half the ids, unordered
    with torch.no_grad():  # larger than the training init, so drafts differ from row to row
        for name, p in head.named_parameters():
            if name.endswith("weight_t") and not name.startswith("draft_head"):
                p.normal_(0, 0.3)
    return head.eval()


def _sequences(target) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(1)
    v = target.config.vocab_size
    return {"a": torch.randint(3, v, (14,), generator=gen).tolist(), "b": torch.randint(3, v, (9,), generator=gen).tolist()}


def _feature_batch(seqs, feats, rows: dict[str, range], tables: dict[str, list[int]], propose: dict[str, bool],
                   temps: dict[str, float], max_drafts: dict[str, int]) -> FeatureBatch:
    ids = list(rows)
    starts = [0]
    for r in ids:
        starts.append(starts[-1] + len(rows[r]))
    width = max(len(t) for t in tables.values())
    return FeatureBatch(
        request_ids=ids, hidden=torch.cat([feats[r][list(rows[r])] for r in ids]),
        token_ids=torch.tensor([seqs[r][p] for r in ids for p in rows[r]]),
        next_token_ids=torch.tensor([seqs[r][p + 1] for r in ids for p in rows[r]]),
        positions=torch.tensor([p for r in ids for p in rows[r]]), starts=starts,
        seq_lens=[rows[r][-1] + 1 for r in ids],
        block_tables=torch.tensor([tables[r] + [0] * (width - len(tables[r])) for r in ids]), block_size=BLOCK,
        propose=[propose[r] for r in ids], temperatures=[temps[r] for r in ids], max_drafts=[max_drafts[r] for r in ids])


def _propose(head, seqs, feats, temps: dict[str, float], min_draft_prob: float = 0.0):
    """Two steps, as the runner would call them: a's prompt in two chunks, b's prompt then one decode row."""
    prop = EagleProposer(head, num_speculative_tokens=K, min_draft_prob=min_draft_prob)
    prop.allocate_cache(num_blocks=10, block_size=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    tables = {"a": [5, 2, 9, 0], "b": [3, 7, 1]}  # scattered blocks, with room for the lookahead slots
    prop.propose_from_features(_feature_batch(seqs, feats, {"a": range(0, 6), "b": range(0, 7)}, tables,
                                              {"a": False, "b": True}, temps, {"a": 9, "b": 9}))
    return prop.propose_from_features(_feature_batch(seqs, feats, {"a": range(6, 13), "b": range(7, 8)}, tables,
                                                     {"a": True, "b": True}, temps, {"a": 9, "b": 2}))


def _train_forward_drafts(head, seq: list[int], feats: torch.Tensor, last: int, k: int,
                          with_confidence: bool = False):
    """Chain drafts from the training forward: the depth-j row at last + j - 1, its ids the drafts so far."""
    drafts: list[int] = []
    confidence: list[float] = []
    for j in range(1, k + 1):
        ids = torch.tensor(seq[1:last + 2] + drafts)[None]  # row p holds x_{p+1}
        f = torch.cat([feats[:last + 1], torch.zeros(len(drafts), feats.shape[1])])[None]  # rows past `last`: unused
        outs = head.forward_train(ids, f, depth=j)
        probs = torch.softmax(head.draft_logits(outs[-1][0, last + j - 1]), dim=-1)
        drafts.append(int(head.draft_vocab[probs.argmax()]))
        confidence.append(float(probs.max()))
    return (drafts, confidence) if with_confidence else drafts


def test_paged_proposals_equal_the_training_forward(target):
    head = _head(target)
    seqs = _sequences(target)
    feats = dict(zip(seqs, target_features(target, list(seqs.values()))))
    out = _propose(head, seqs, feats, {"a": 0.0, "b": 0.0})
    with torch.no_grad():
        assert out["a"].token_ids == _train_forward_drafts(head, seqs["a"], feats["a"], 12, K)
        assert out["b"].token_ids == _train_forward_drafts(head, seqs["b"], feats["b"], 7, 2)  # max_drafts cut it
    assert out["a"].probs is None and out["b"].probs is None
    assert len(set(out["a"].token_ids) | set(out["b"].token_ids)) > 1


def test_drafting_stops_when_the_head_doubts_its_drafts(target):
    head = _head(target)
    seqs = _sequences(target)
    feats = dict(zip(seqs, target_features(target, list(seqs.values()))))
    with torch.no_grad():
        drafts, confidence = _train_forward_drafts(head, seqs["a"], feats["a"], 12, K, with_confidence=True)
    chance = torch.tensor(confidence).cumprod(0).tolist()  # the head's P(drafts 1..j all accepted)
    for keep in range(K + 1):  # a threshold just below the chance of the keep-th draft keeps exactly keep drafts
        threshold = chance[keep - 1] * 0.999 if keep else min(1.0, chance[0] * 1.001)
        if keep < K and chance[keep] >= threshold:
            continue  # two drafts' chances too close to tell apart
        out = _propose(head, seqs, feats, {"a": 0.0, "b": 0.0}, min_draft_prob=threshold)
        got = out["a"].token_ids if "a" in out else []  # no drafts: no proposal at all
        assert got == drafts[:keep]


def test_sampled_proposals_return_their_distribution(target):
    head = _head(target)
    seqs = _sequences(target)
    feats = dict(zip(seqs, target_features(target, list(seqs.values()))))
    out = _propose(head, seqs, feats, {"a": 0.8, "b": 0.0})
    q = out["a"].probs
    assert q.shape == (K, target.config.vocab_size) and q.dtype == torch.float32
    assert torch.allclose(q.sum(-1), torch.ones(K), atol=1e-5)
    assert all(float(q[j, d]) > 0 for j, d in enumerate(out["a"].token_ids))
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[head.draft_vocab] = False
    assert float(q[:, outside].sum()) == 0.0  # q lives on the draft vocabulary
    assert out["b"].probs is None


def test_checkpoint_round_trip(target, tmp_path):
    head = _head(target)
    path = save_eagle(head, tmp_path / "head.safetensors", {"num_speculative_tokens": 4})
    meta = read_eagle_metadata(path)
    assert meta["draft_vocab_size"] == str(head.draft_vocab_size) and meta["num_speculative_tokens"] == "4"
    assert path.stat().st_size < 200_000  # the head's own weights only, fp16: no embedding, no LM head
    loaded = load_eagle(path, target)
    assert torch.equal(loaded.draft_vocab, head.draft_vocab)
    want = {k: v.half().float() for k, v in head.trained_state().items()}
    got = loaded.trained_state()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    packed = load_eagle(path, target, quantization="fp16")  # the CPU inference format
    g = torch.randn(3, target.config.hidden_size)
    assert torch.allclose(packed.draft_logits(g), loaded.draft_logits(g), atol=1e-2)


def test_gguf_packs_the_head_as_q8_0_and_drafts_through_the_c_stack(target):
    from engine.linear import GGUFWeights, Linear

    head = _head(target)
    plain = {name: m.weight_t.detach().t().clone() for name, m in head.named_modules() if isinstance(m, Linear)}
    head.pack_linears("gguf")
    for name, m in head.named_modules():
        if isinstance(m, Linear):
            assert isinstance(m.packed, GGUFWeights) and m.packed.kind == "q8_0"
            w = m.packed.dequantized()
            assert ((w - plain[name]).norm() / plain[name].norm()).item() < 0.01  # ggml's Q8_0 rounding
    assert head.stack is not None
    seqs = _sequences(target)
    feats = dict(zip(seqs, target_features(target, list(seqs.values()))))
    head.stack = counting = CountingStack(head.stack)
    fused = _propose(head, seqs, feats, {"a": 0.0, "b": 0.0})
    head.stack = None  # the same blocks, layer by layer
    plain_path = _propose(head, seqs, feats, {"a": 0.0, "b": 0.0})
    assert counting.calls > 0
    assert {r: p.token_ids for r, p in fused.items()} == {r: p.token_ids for r, p in plain_path.items()}


def test_draft_vocabulary_keeps_eos():
    samples = [Sample([5, 6, 7, 7, 7, 8, 8], 2, True)]
    vocab = build_draft_vocab(samples, vocab_size=20, size=4, always={2})
    assert vocab.tolist() == [2, 5, 7, 8] or vocab.tolist() == [2, 6, 7, 8]
    assert 2 in vocab.tolist() and 7 in vocab.tolist()


def _motif_samples(target) -> tuple[list[Sample], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    v = target.config.vocab_size
    motif = torch.randint(3, v, (12,), generator=gen).tolist()  # repeated patterns: something to learn
    samples = [Sample(torch.randint(3, v, (4,), generator=gen).tolist() + motif[i % 5:] + motif * 2, 4, True)
               for i in range(8)]
    return samples, target_features(target, [s.token_ids for s in samples])


def _fresh(target, samples) -> EagleHead:
    torch.manual_seed(0)
    return EagleHead(target, build_draft_vocab(samples, target.config.vocab_size, 64, {2}))


def _train(head: EagleHead, samples, feats) -> list[float]:
    index = torch.full((head.config.vocab_size,), IGNORE)
    index[head.draft_vocab] = torch.arange(head.draft_vocab_size)
    batches = make_batches(samples, feats, index, batch_tokens=256, device=torch.device("cpu"))
    return train_head(head, batches, TrainConfig(epochs=30, depth=2, lr=1e-2, progress=False))


def test_a_short_training_run_lowers_the_loss(target):
    samples, feats = _motif_samples(target)
    head = _fresh(target, samples)
    before = evaluate_acceptance(head, samples, feats, k=K)
    losses = _train(head, samples, feats)
    after = evaluate_acceptance(head, samples, feats, k=K)
    assert losses[-1] < 0.8 * losses[0]  # the feature loss keeps a floor: the input noise
    assert 1.0 <= before.mean_accepted_length < after.mean_accepted_length <= K + 1


def test_fine_tuning_starts_from_the_given_head(target, tmp_path):
    """`--init`: the saved head's weights and draft vocabulary carry over; the borrowed LM head stays fixed."""
    samples, feats = _motif_samples(target)
    trained = _fresh(target, samples)
    losses = _train(trained, samples, feats)
    path = save_eagle(trained, tmp_path / "trained.safetensors")
    data = TrainingData(target, samples, feats, samples, feats, {2}, {})
    head, tuned = fit_head(TrainConfig(epochs=1, depth=2, lr=1e-6, progress=False, init=path), data)
    assert torch.equal(head.draft_vocab, trained.draft_vocab)
    assert torch.equal(head.draft_head.weight_t, trained.draft_head.weight_t)
    assert tuned[0] < 1.1 * losses[-1] < losses[0]  # it goes on from the trained head's loss, not a fresh one's
    kept = evaluate_acceptance(head, samples, feats, k=K).mean_accepted_length
    assert kept == pytest.approx(evaluate_acceptance(trained, samples, feats, k=K).mean_accepted_length, abs=0.3)


def _tiny_tokenizer(tiny_llama_dir):
    from engine.default_model import resolve_model
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(str(tiny_llama_dir)))


def test_user_turn_prefix_is_the_template_up_to_the_user_text(tiny_llama_dir):
    tok = _tiny_tokenizer(tiny_llama_dir)
    assert user_turn_prefix(tok, None) == "<|im_start|>user\n"
    assert user_turn_prefix(tok, "Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_self_written_conversations_keep_finished_distinct_turns(tiny_llama_dir):
    from types import SimpleNamespace

    texts = iter([(" What is rope? ", "stop"), ("What is rope?", "stop"), ("Tell me about a very long", "length"),
                  ("Hi", "stop"), ("Name three rivers.", "stop"), ("Why is ice slippery?", "stop")])
    seen_prompts = []

    class FakeLLM:  # stands in for `LLM`: what the target would sample after each prefix
        def get_tokenizer(self):
            return _tiny_tokenizer(tiny_llama_dir)

        def generate(self, prompts, params, use_tqdm=False):
            seen_prompts.extend(prompts)
            assert len({p.seed for p in params}) == len(params)  # every turn sampled with its own seed
            return [SimpleNamespace(outputs=[SimpleNamespace(text=t, finish_reason=r)]) for t, r in
                    (next(texts) for _ in prompts)]

    convs = self_written_conversations(FakeLLM(), 4, seed=1)
    assert len(seen_prompts) == 6 and all(p.endswith("<|im_start|>user\n") for p in seen_prompts)
    users = [c[-1]["content"] for c in convs]
    assert users == ["What is rope?", "Name three rivers.", "Why is ice slippery?"]  # no repeats, cut-offs, scraps
    assert all(c[-1]["role"] == "user" and all(m["role"] == "system" for m in c[:-1]) for c in convs)


def test_cli_has_train_eagle():
    from gateway.cli import build_parser

    args = build_parser().parse_args(["train-eagle", "--out", "h.safetensors", "--prompts", "10", "--epochs", "1"])
    assert args.prompts == 10 and args.epochs == 1 and args.model == "smollm2"


@pytest.mark.slow
def test_the_shipped_head_fits_the_default_model():
    from decoding.eagle import DEFAULT_HEAD

    meta = read_eagle_metadata(DEFAULT_HEAD)
    assert meta["target"] == "smollm2" and float(meta["mean_accepted_length"]) >= 2.5
    head = load_eagle(DEFAULT_HEAD, load_model("smollm2", "cpu", "auto", "none").model)
    assert head.draft_vocab_size == 8192 and 2 in head.draft_vocab.tolist()  # <|im_end|> can be drafted


def test_the_head_is_skipped_while_the_batch_is_too_large_to_draft(target, tiny_llama_dir, tmp_path, monkeypatch):
    from engine import LLM, SamplingParams

    path = save_eagle(_head(target), tmp_path / "head.safetensors")
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=BLOCK, quantization="none", speculative="eagle",
              speculative_model=str(path), num_speculative_tokens=K, speculative_max_batch=1,
              speculative_min_draft_prob=0)  # a random head is never sure of its drafts
    proposer = llm.engine.runner.proposer
    calls: list[list[str]] = []
    real = proposer.propose_from_features
    monkeypatch.setattr(proposer, "propose_from_features", lambda fb: calls.append(fb.request_ids) or real(fb))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    # both sample in every step; then the second runs alone, but its head KV has holes: the head stays off
    llm.generate(["one two three", "four five six seven"], [short, params])
    assert calls == [] and llm.engine.stats().spec_draft_tokens == 0
    assert llm.engine.runner.undraftable == {"offline-1"}  # offline-0 finished first and was forgotten
    llm.generate(["one two three"], params)  # alone: the head runs and drafts
    assert calls and llm.engine.stats().spec_draft_tokens > 0
    assert not llm.engine.runner.undraftable  # the finished requests were forgotten at the next step
    # a prompt longer than the step's token budget: its chunks reach the head from the first, in steps
    # that sample nothing, so that the head's KV has no holes
    chunked = LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=BLOCK, quantization="none", speculative="eagle",
                  speculative_model=str(path), num_speculative_tokens=K, speculative_max_batch=1,
                  speculative_min_draft_prob=0, max_num_batched_tokens=8)
    seen: list[FeatureBatch] = []
    monkeypatch.setattr(chunked.engine.runner.proposer, "propose_from_features", lambda fb: seen.append(fb) or {})
    chunked.generate(["a long prompt that takes a few chunks of eight tokens to get in"], params)
    assert [fb.seq_lens[0] for fb in seen[:2]] == [8, 16] and not any(seen[0].propose)


def test_the_shipped_head_on_another_model_says_how_to_get_one(tiny_llama_dir):
    from engine import LLM

    with pytest.raises(ValueError, match=r"fits the default model .*sluice train-eagle"):
        LLM(str(tiny_llama_dir), num_kv_blocks=16, quantization="none", speculative="eagle")
