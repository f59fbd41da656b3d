"""What AMIA gathers per Linear from the tokens it weights, and the weight it then writes.

Two rules, chosen by ``AdaptiveInputActivation.reconstruction``:

- ``ChannelNorms`` (``wanda``): per input channel, the sum of squared inputs
  (float64, so sums do not depend on sample order or rank); the mask is Wanda's
  ``|W| * ||X||`` rule (``prune_mask``). Only zeros are written.
- ``TokenHessians`` (``sparsegpt``): SparseGPT's Hessian ``H = 2/N sum x x^T``
  over ``N`` samples, built by llm-compressor's own ``accumulate_hessian`` (float32,
  as its SparseGPT), and the weights its ``sparsify_weight`` reconstructs: the
  kept weights change too.

Both take, per sample, the rows ``sqrt(w_t) x_t`` that ``token_weighting`` gives.
Under torchrun the rank that owns a module computes its result, which is then
broadcast (a mask for Wanda, the whole weight for SparseGPT): the channel norms
(small) are summed onto every rank, bitwise alike; each Hessian (columns^2) is
summed onto its owner only, as llm-compressor's GPTQ does, so no rank holds more
than its own Hessians and the sums it owns.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import align_module_device, get_execution_device
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
    accumulate_hessian,
    make_empty_hessian,
    sparsify_weight,
)

from tamp_modifier.modifiers.distributed import rank, reduce_to_rank, sum_across_ranks
from tamp_modifier.pruning.wanda_rule import prune_mask

__all__ = ["RECONSTRUCTIONS", "ChannelNorms", "TokenHessians"]


class ChannelNorms:
    """Wanda's statistic: squared input sums per channel, and the weight behind them."""

    def __init__(self) -> None:
        self.sq_sums: dict[torch.nn.Module, torch.Tensor] = {}
        self.totals: dict[torch.nn.Module, torch.Tensor] = {}

    def add(self, module: torch.nn.Module, rows: torch.Tensor, token_weight: float) -> None:
        """Add one sample's weighted rows ``[tokens, columns]``; ``token_weight`` is ``sum_t w_t``."""
        if module not in self.sq_sums:
            self.empty(module, rows.device)
        self.sq_sums[module] += rows.double().square().sum(0)
        self.totals[module] += token_weight

    def empty(self, module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        # float64: a float32 value squares exactly, and the sums over samples then
        # do not depend on their order (nor on which rank saw which sample)
        # beyond ~1e-16 relative, so a torchrun run equals a one-process run.
        self.sq_sums[module] = torch.zeros(module.weight.shape[1], dtype=torch.float64, device=device)
        self.totals[module] = torch.zeros((), dtype=torch.float64)

    def reduce_across_ranks(self, modules: list[torch.nn.Module], owner: dict) -> None:
        """Every rank gets the sums over all ranks (one collective pair for all modules)."""
        summed = iter(sum_across_ranks([t for m in modules for t in (self.sq_sums[m], self.totals[m])]))
        for m in modules:
            self.sq_sums[m], self.totals[m] = next(summed), next(summed)

    def result(self, module: torch.nn.Module, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
        """Wanda's mask (True = prune) from the weighted channel norms."""
        norm = torch.sqrt(self.sq_sums[module] / self.totals[module].clamp(min=1))
        with torch.no_grad(), align_module_device(module):
            weight = module.weight.data
            return prune_mask(weight, norm.to(weight.device), sparsity, prune_n, prune_m)

    @staticmethod
    def result_dtype(module: torch.nn.Module) -> torch.dtype:
        return torch.bool

    @staticmethod
    def new_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight.masked_fill(mask, 0)

    def drop(self, module: torch.nn.Module) -> dict:
        """Free the module's statistic; what the report keeps of it."""
        del self.sq_sums[module], self.totals[module]
        return {}


class TokenHessians:
    """SparseGPT's statistic (llm-compressor's Hessian) and its weight reconstruction."""

    def __init__(self, block_size: int, dampening_frac: float) -> None:
        self.block_size, self.dampening_frac = block_size, dampening_frac
        self.hessians: dict[torch.nn.Module, torch.Tensor] = {}
        self.samples: dict[torch.nn.Module, int] = {}
        self.losses: dict[torch.nn.Module, float] = {}

    def add(self, module: torch.nn.Module, rows: torch.Tensor, token_weight: float) -> None:
        """Add one sample: it counts as one of the ``N`` samples, as in llm-compressor (the
        weights are already in the rows, so ``token_weight`` is not needed)."""
        if module not in self.hessians:
            self.empty(module)
        self.hessians[module], self.samples[module] = accumulate_hessian(
            rows.unsqueeze(0), module, self.hessians[module], self.samples[module])

    def empty(self, module: torch.nn.Module) -> None:
        # On the module's execution device, as llm-compressor's SparseGPT keeps it.
        self.hessians[module] = make_empty_hessian(module, device=get_execution_device(module))
        self.samples[module] = 0

    def reduce_across_ranks(self, modules: list[torch.nn.Module], owner: dict) -> None:
        """Each Hessian summed onto its owner rank; the other ranks drop theirs."""
        counts = sum_across_ranks([torch.tensor(float(self.samples[m]), dtype=torch.float64)
                                   for m in modules])
        for m, total in zip(modules, counts):
            # H is a mean over this rank's samples: what sums over ranks is H * N.
            summed = reduce_to_rank(self.hessians[m] * self.samples[m], owner[m])
            self.samples[m] = int(total.item())
            if rank() == owner[m]:
                self.hessians[m] = summed / max(self.samples[m], 1)
            else:
                del self.hessians[m]

    def result(self, module: torch.nn.Module, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
        """The reconstructed weight (pruned ones zero), from llm-compressor's ``sparsify_weight``."""
        with torch.no_grad(), align_module_device(module):
            loss, weight = sparsify_weight(
                module=module, hessians_dict=self.hessians, sparsity=sparsity, prune_n=prune_n,
                prune_m=prune_m, block_size=self.block_size, dampening_frac=self.dampening_frac,
                preserve_sparsity_mask=False,
            )  # removes the module's Hessian from the dict
        self.losses[module] = loss
        return weight

    @staticmethod
    def result_dtype(module: torch.nn.Module) -> torch.dtype:
        return module.weight.dtype

    @staticmethod
    def new_weight(weight: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
        return reconstructed.to(device=weight.device, dtype=weight.dtype)

    def drop(self, module: torch.nn.Module) -> dict:
        self.hessians.pop(module, None)  # sparsify_weight already took it on the owner rank
        samples = self.samples.pop(module)
        loss = self.losses.pop(module, None)  # only the owner rank computed it
        return {"samples": samples, **({"loss": loss} if loss is not None else {})}


RECONSTRUCTIONS = ("wanda", "sparsegpt")
