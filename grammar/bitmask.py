"""Token bitmasks: int32 [B, ceil(V/32)], bit t of row b set = token t allowed for row b.

Matchers fill rows on the CPU (the backends write through raw pointers); `apply_bitmask` turns
the rows into -inf on the logits wherever they live, vectorised, in place.
"""
from __future__ import annotations

import torch

from grammar.vocab import bitmask_width

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask [batch, ceil(vocab_size/32)] int32 with every token allowed (-1 = all 32 bits set),
    so a row no matcher fills leaves its logits untouched. Pinned when CUDA is there: the copy to the
    GPU in `apply_bitmask` is then asynchronous."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32,
                      pin_memory=torch.cuda.is_available())


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [B, W] int32 -> allowed [B, vocab_size] bool. Columns past 32 * W are False."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS.setdefault(bitmask.device, torch.arange(32, dtype=torch.int32, device=bitmask.device))
    batch, width = bitmask.shape
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(batch, width * 32).bool()  # [B, 32 * W]
    if width * 32 >= vocab_size:
        return bits[:, :vocab_size]
    return torch.cat([bits, bits.new_zeros(batch, vocab_size - width * 32)], dim=1)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """logits[r, t] = -inf where bit t of bitmask[r] is 0, in place, for r in `rows` (None = every row).

    logits: [B, V] on any device; bitmask: [>= B, W] int32 (row r masks logits row r; extra rows of a
    preallocated mask are ignored), usually the CPU tensor the matchers filled. Rows not listed are
    not touched. Returns logits.
    """
    if rows is not None and not rows:
        return logits
    batch, vocab_size = logits.shape
    if bitmask.shape[0] < batch:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {batch} rows of logits")
    if rows is None:
        allowed = unpack_bitmask(bitmask[:batch].to(logits.device, non_blocking=True), vocab_size)  # [B, V]
        return logits.masked_fill_(~allowed, float("-inf"))
    picked = bitmask.index_select(0, torch.tensor(rows, dtype=torch.long, device=bitmask.device))  # [R, W]
    allowed = unpack_bitmask(picked.to(logits.device, non_blocking=True), vocab_size)  # [R, V]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)  # [R]
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))  # [R, V]
    return logits.index_copy_(0, index, masked)


def allowed_token_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    """The token ids a bitmask row [W] allows (for tests, debugging and jump-forward checks)."""
    return unpack_bitmask(row.view(1, -1), vocab_size)[0].nonzero().view(-1).tolist()
