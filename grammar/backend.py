"""The backend interface: GrammarBackend.compile(spec) -> CompiledGrammar; CompiledGrammar.matcher() -> Matcher.

Matcher semantics, the same for every backend (the base class implements the parts that are not
backend-specific, so both backends agree on them):

- fill_bitmask(bitmask, row) writes the allowed next tokens; accept_token(t) is True exactly for the
  tokens the filled row allows (and leaves the state unchanged when False).
- EOS (any of the vocabulary's EOS ids) is allowed exactly where the grammar may end. EOS is never
  passed to the backend: the base class records it, so every backend treats it alike.
- is_finished(): the output is complete; True once an EOS was accepted, or as soon as the grammar
  has ended with no continuation possible (e.g. after the closing `}` of a compact JSON object):
  from then on only EOS is allowed, so the engine may stop the request right away without spending a
  step on sampling the EOS. It is also True when the backend failed mid-request (`error` says why).
- rollback(k) undoes the last k accepted tokens (EOS included), for any k up to num_accepted:
  where the backend's own history is shorter, the matcher replays from the start.
- A Matcher belongs to one request and is not thread-safe; a CompiledGrammar is immutable and
  may be shared by any number of requests and threads.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from grammar.spec import GrammarSpec
from grammar.vocab import TokenVocab


class Matcher(ABC):
    """One request's position in a grammar."""

    def __init__(self, vocab: TokenVocab):
        self.vocab = vocab
        self._eos = frozenset(vocab.eos_token_ids)
        self._tokens: list[int] = []  # every accepted token, in order (EOS included): what rollback replays
        self._num_eos = 0  # EOS tokens at the end of _tokens; the backend has seen all the others
        self._checked: torch.Tensor | None = None  # the last bitmask found well-formed

    # -- the interface ------------------------------------------------------------------------------

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row]. bitmask: CPU int32 [B, vocab.width], row contiguous."""
        if bitmask is not self._checked:  # the engine reuses one bitmask: check it once, not every step
            if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.stride(-1) != 1 \
                    or bitmask.dim() != 2 or bitmask.shape[1] != self.vocab.width:
                raise ValueError(f"bitmask must be a CPU int32 tensor [B, {self.vocab.width}] with contiguous rows")
            self._checked = bitmask
        if not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"bitmask {tuple(bitmask.shape)} has no row {row}")
        if self._num_eos or self.error is not None:
            bitmask[row].copy_(self.vocab.eos_row)
        else:
            # raw address of the row: the backends write the 4 * width bytes there without copies
            self._fill(bitmask.data_ptr() + row * bitmask.stride(0) * 4)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. False, state unchanged, if the grammar does not allow it here."""
        if token_id in self._eos:
            if not (self._num_eos or self.error is not None or self._can_end()):
                return False
            self._num_eos += 1
        elif self._num_eos or not 0 <= token_id < len(self.vocab.token_bytes) or not self._advance(token_id):
            return False
        self._tokens.append(token_id)
        return True

    def feed(self, token_id: int) -> tuple[str | None, bool]:
        """accept_token as the engine uses it: (the error that ends the request, or None; is_finished()).

        The error is a refused token, a backend that gave up, or one that raised: a backend's failure
        is its request's alone, never the whole step's."""
        try:
            if not self.accept_token(token_id):
                return "the grammar refused a sampled token", False
            if self.error is not None:
                return f"grammar error: {self.error}", False
            return None, self.is_finished()
        except Exception as exc:  # noqa: BLE001 - any backend exception
            return f"grammar error: {type(exc).__name__}: {exc}", False

    def rollback(self, k: int) -> None:
        """Undo the last k accepted tokens (speculative decoding's rejected drafts, preemption)."""
        if not 0 <= k <= len(self._tokens):
            raise ValueError(f"cannot roll back {k} tokens: {len(self._tokens)} accepted")
        if k == 0:
            return
        eos = min(k, self._num_eos)
        self._num_eos -= eos
        del self._tokens[len(self._tokens) - k:]
        if k > eos and not self._rollback(k - eos):
            self._replay()

    def is_finished(self) -> bool:
        """The output is complete (see the module docstring): stop the request now."""
        return self._num_eos > 0 or self.error is not None or self._is_terminal()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation from here (jump-forward), without advancing:
        the caller accepts them (accept_token each) and feeds them to the model. Empty when the next token
        is not unique, and once finished (the EOS that remains is not forced on the engine)."""
        try:
            return [] if self.is_finished() else self._forced()
        except Exception:  # noqa: BLE001 - no jump-forward; the next step's mask fill reports the failure
            return []

    def reset(self) -> None:
        """Back to the start, as if no token had been accepted."""
        self._tokens.clear()
        self._num_eos = 0
        self._reset()

    @property
    def num_accepted(self) -> int:
        return len(self._tokens)

    @property
    def error(self) -> str | None:
        """Why the backend gave up mid-request (e.g. a resource limit), or None. Once set, only EOS is allowed."""
        return None

    # -- what a backend provides ---------------------------------------------------------------------

    @abstractmethod
    def _fill(self, row_pointer: int) -> None:
        """Write vocab.width int32 words of allowed tokens (EOS bits where the grammar may end) at the address."""

    @abstractmethod
    def _advance(self, token_id: int) -> bool:
        """Consume a non-EOS token; False and no state change if not allowed."""

    @abstractmethod
    def _rollback(self, n: int) -> bool:
        """Undo the last n non-EOS tokens; False (state untouched) when the backend's history is too short."""

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _can_end(self) -> bool:
        """The grammar is satisfied here (EOS allowed)."""

    @abstractmethod
    def _is_terminal(self) -> bool:
        """The grammar is satisfied here and nothing but EOS may follow."""

    @abstractmethod
    def _forced(self) -> list[int]: ...

    def _replay(self) -> None:
        self._reset()
        for token in self._tokens[: len(self._tokens) - self._num_eos]:
            if not self._advance(token):
                raise RuntimeError(f"grammar backend refused to replay token {token} it had accepted")


class CompiledGrammar(ABC):
    """A compiled spec: immutable, thread-safe, shared by every request with the same spec."""

    backend: ClassVar[str]

    def __init__(self, spec: GrammarSpec, vocab: TokenVocab):
        self.spec = spec
        self.vocab = vocab

    @abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar (cheap: microseconds)."""


class GrammarBackend(ABC):
    """Compiles specs against one tokenizer. compile() may be called from several threads at once."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]]  # the spec kinds it supports

    def __init__(self, tokenizer: Any, vocab: TokenVocab):
        self.vocab = vocab

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError for an invalid, unsupported or too complex spec. May be slow: the
        GrammarCompiler front runs it in a worker thread under a time limit."""
