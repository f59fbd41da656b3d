"""Which of a sample's tokens a pruning statistic sees, and with what weight.

AMIA picks, per sample and Linear, the tokens that represent the sample
(``select_tokens``). A statistic built from inputs ``x_t`` (Wanda's channel
norms, SparseGPT's Hessian ``H = 2/N sum_t x_t x_t^T``) can then take:

- ``selected``: the selected tokens only, ``w_t = 1`` if ``t`` is selected, else 0;
- ``upweighted``: every token, the selected ones ``selected_weight`` times as
  much, ``w_t = selected_weight`` if ``t`` is selected, else 1.

Both statistics are sums of squares of the inputs, so a weighted token enters
as ``sqrt(w_t) * x_t``: the rows returned here. ``selected_weight = 1`` is every
token, as llm-compressor's Wanda and SparseGPT use.
"""

from __future__ import annotations

import torch

from tamp_modifier.validation import one_of

__all__ = ["TOKEN_WEIGHTINGS", "token_weights", "weighted_rows"]

TOKEN_WEIGHTINGS = ("selected", "upweighted")


def token_weights(num_tokens: int, chosen: torch.Tensor, weighting: str, selected_weight: float = 1.0,
                  ) -> torch.Tensor:
    """``w_t`` for each of ``num_tokens`` tokens (float32), given the ``chosen`` indices.

    >>> token_weights(4, torch.tensor([1, 3]), "upweighted", 5.0).tolist()
    [1.0, 5.0, 1.0, 5.0]
    """
    one_of("token_weighting", weighting, TOKEN_WEIGHTINGS)
    base = 0.0 if weighting == "selected" else 1.0
    weights = torch.full((num_tokens,), base, dtype=torch.float32, device=chosen.device)
    weights[chosen] = 1.0 if weighting == "selected" else float(selected_weight)
    return weights


def weighted_rows(inputs: torch.Tensor, chosen: torch.Tensor, weighting: str, selected_weight: float = 1.0,
                  ) -> torch.Tensor:
    """The rows ``sqrt(w_t) * x_t`` with ``w_t > 0``, from ``inputs`` ``[tokens, columns]``.

    ``selected`` returns the chosen rows themselves, and ``upweighted`` with weight 1
    the inputs themselves (no multiplication: a sum over them is bitwise the plain sum).
    """
    one_of("token_weighting", weighting, TOKEN_WEIGHTINGS)
    if weighting == "selected":
        return inputs[chosen]
    if selected_weight == 1.0:
        return inputs  # every token, unscaled: bitwise llm-compressor's input
    weights = token_weights(inputs.shape[0], chosen, weighting, selected_weight)
    # At least float32: a bfloat16 product would round every scaled input.
    wide = inputs.to(torch.promote_types(inputs.dtype, torch.float32))
    return wide * weights.sqrt().unsqueeze(1)
