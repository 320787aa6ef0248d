"""Activation calibration for int8 weights: which input channels of each linear layer carry outliers.

Small Llama-family models have a few hidden channels whose activations are hundreds of times the
median (here up to |x| ~ 2000 into some down projections). Those channels are properties of the
model, not of the text, so one short forward at load finds them; the int8 kernel keeps them in fp32.
"""
from __future__ import annotations

import torch

from engine.linear import Linear
from engine.model import LlamaForCausalLM

# Written for calibration: chat turns, prose, code, numbers and JSON, so every kind of token shows up.
CALIBRATION_CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
    {"role": "user", "content": "How do I reverse a list in Python, and what does it cost?"},
    {"role": "assistant", "content": "Use xs.reverse() to reverse in place, or xs[::-1] for a new list. "
                                     "Both take O(n) time; the slice also needs O(n) memory."},
    {"role": "user", "content": "Reply in JSON with the keys city and population for the largest city "
                                "in Japan, then count from 1 to 12."},
    {"role": "assistant", "content": '{"city": "Tokyo", "population": 13960000} 1, 2, 3, 4, 5, 6, 7, 8, '
                                     "9, 10, 11, 12. The old mill by the river still grinds flour on Sundays."},
]
OUTLIERS_PER_LAYER = 32
OUTLIER_RATIO = 6.0


def input_absmax(model: LlamaForCausalLM, token_ids: list[int]) -> dict[Linear, torch.Tensor]:
    """Max |x| per input channel of every Linear over one run of `token_ids` (fp32, unpacked model)."""
    from engine.model_runner import prompt_hidden  # the runner imports the model: no cycle at import

    stats: dict[Linear, torch.Tensor] = {}

    def record(module: Linear, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        absmax = inputs[0].detach().abs().amax(dim=0)
        stats[module] = absmax if module not in stats else torch.maximum(stats[module], absmax)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Linear)]
    try:
        with torch.inference_mode():
            model.compute_logits(prompt_hidden(model, token_ids))
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def outlier_channels(model: LlamaForCausalLM, token_ids: list[int], ratio: float = OUTLIER_RATIO,
                     limit: int = OUTLIERS_PER_LAYER) -> dict[Linear, torch.Tensor]:
    """Per Linear, the input channels (at most `limit`, largest first) whose max |x| exceeds `ratio`
    times the layer's median; most layers have none, and pay nothing for the fp32 path."""
    found = {}
    for module, absmax in input_absmax(model, token_ids).items():
        big = torch.nonzero(absmax > ratio * absmax.median()).flatten()
        found[module] = big[absmax[big].argsort(descending=True)][:limit].sort().values
    return found
