"""AdaptiveInputActivation: Wanda or SparseGPT, from the tokens that matter."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from compressed_tensors.utils import match_named_modules, update_offload_parameter
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from loguru import logger
from pydantic import PrivateAttr, field_validator, model_validator

from tamp_modifier.deploy.save_hook import install_save_hook
from tamp_modifier.modifiers.distributed import (
    any_rank,
    assign_to_ranks,
    barrier,
    broadcast_object,
    is_distributed,
    rank,
    results_from_owners,
    shares_offload,
    sum_across_ranks,
    union_across_ranks,
    world_size,
)
from tamp_modifier.modifiers.layer_statistics import RECONSTRUCTIONS, ChannelNorms, TokenHessians
from tamp_modifier.modifiers.pattern_check import check_pattern_kept, warn_pattern_breaking_steps
from tamp_modifier.modifiers.ratio_handover import pruned_by_targets
from tamp_modifier.modifiers.scope import SCOPES, confine_to_text_decoder
from tamp_modifier.modifiers.token_labels import CalibrationTokenLabels
from tamp_modifier.pruning.modality import resolve_modality_token_ids
from tamp_modifier.pruning.selection_accumulator import (
    TOKEN_SELECTIONS,
    SelectionAccumulator,
    TokenChoice,
    last_query_attention,
    random_selection_seed,
)
from tamp_modifier.pruning.token_weighting import TOKEN_WEIGHTINGS
from tamp_modifier.pruning.wanda_rule import parse_mask_structure
from tamp_modifier.report.sections import amia_layer_row, amia_section, attach_section
from tamp_modifier.validation import above, as_list, at_least, in_range, one_of

__all__ = ["AdaptiveInputActivation", "check_every_target_pruned"]


class AdaptiveInputActivation(SparsityModifierBase):
    """Adaptive Multimodal Input Activation (AMIA), the token-adaptive half of TAMP.

    Wanda scores weight ``W_rk`` by ``|W_rk| * ||X_k||``, the norm of input
    channel ``k`` over all calibration tokens, which the many image tokens
    dominate. AMIA measures ``||X_k||`` over the tokens each decoder block
    attends to, chosen greedily in each Linear's output space until they represent
    all the sample's tokens (``tamp_modifier.select_tokens``). Pruning is then
    Wanda's: per output row, or N:M. Placed after ``DiversityAwareSparsity`` in
    the same recipe, it prunes every layer at the ratio DAS assigned: that is TAMP.

    With ``reconstruction: sparsegpt`` the same tokens build SparseGPT's Hessian
    ``H = 2/N sum_t w_t x_t x_t^T`` instead (``w_t`` from ``token_weighting``), and
    llm-compressor's SparseGPT prunes and reconstructs each Linear from it: with
    every token weighted 1 that is llm-compressor's ``SparseGPTModifier``.

    Lifecycle:

    - on_initialize
        - confine_to_text_decoder (``scope: text_decoder``)
        - the modality token ids, the token labels, the statistic (``layer_statistics``)
    - on_calibration_start
        - register_hook(module, calibrate_module, "forward") on every pruned Linear
        - the token labels' hooks (input embeddings, decoder blocks); a hook on each
          block's ``self_attn`` for its attention (``amia``, ``attention``)
    - calibrate_module (per batch)
        - held until its block's attention for this batch arrives (q/k/v run first)
        - SelectionAccumulator.update: per sample, choose the tokens, hand their
          weighted rows to the statistic, count them per modality
    - on_sequential_epoch_end -> compress_modules
        - sum the statistics and counts over ranks
        - results_from_owners: each module's mask (or SparseGPT weight), made by
          its owner rank and broadcast; write the weight; one report row per module
    - on_finalize
        - remove_hooks()
        - attach the ``"amia"`` report section (``amia_section``), check_pattern_kept
        - check_every_target_pruned

    Sample yaml (``import tamp_modifier`` first, or use ``tamp-prune``)::

        sparsity_stage:
          sparsity_modifiers:
            DiversityAwareSparsity: {}
            AdaptiveInputActivation:
              sparsity: 0.5
              targets: ["Linear"]
              ignore: ["re:.*vision_tower.*", "re:.*multi_modal_projector.*",
                       "re:.*visual.*", "re:.*lm_head"]

    :param sparsity: share pruned per row (unstructured), unless DAS set ratios
    :param mask_structure: ``"0:0"`` unstructured, or ``"N:M"`` such as ``"2:4"``
    :param token_selection: ``amia`` (default), ``attention`` (tokens attended
        above 1/N), ``random`` (``random_tokens`` per sample, seeded), ``all``
        (plain Wanda)
    :param knn, gamma, penalty_gamma, mmd_scale: the selection's settings (spec)
    :param random_tokens: tokens per sample for ``random``
    :param seed: seed for ``random``
    :param reconstruction: ``wanda`` (default: mask only) or ``sparsegpt`` (mask
        and reconstruction from the selected tokens' Hessian)
    :param token_weighting: ``selected`` (only the selected tokens, default) or
        ``upweighted`` (every token, the selected ones ``selected_weight`` times)
    :param selected_weight: the selected tokens' weight for ``upweighted``
    :param block_size, dampening_frac: SparseGPT's, as in ``SparseGPTModifier``
    :param scope: ``text_decoder`` (default): prune only Linears inside the text
        decoder's layers, found from the model's structure, whatever ``ignore``
        misses; ``targets``: exactly what ``targets``/``ignore`` match
    :param modality_token_ids: ``{image: [ids], ...}``; default from the config
    """

    sparsity: float | list[float] | None = 0.5
    token_selection: str = "amia"
    knn: int = 3
    gamma: float = 1.0
    penalty_gamma: float = 0.2
    mmd_scale: float = 0.1
    random_tokens: int = 100
    seed: int = 0
    modality_token_ids: dict[str, list[int]] | None = None
    reconstruction: str = "wanda"
    token_weighting: str = "selected"
    selected_weight: float = 4.0
    block_size: int = 128
    dampening_frac: float = 0.01
    scope: str = "text_decoder"

    _layer_sparsity: dict[str, float] = PrivateAttr(default_factory=dict)
    _labels: CalibrationTokenLabels | None = PrivateAttr(default=None)
    _modalities: list[str] = PrivateAttr(default_factory=list)
    _block_of: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _attention: dict[str, tuple[int, torch.Tensor]] = PrivateAttr(default_factory=dict)
    _pending: dict[str, list] = PrivateAttr(default_factory=dict)
    _statistic: ChannelNorms | TokenHessians | None = PrivateAttr(default=None)
    _choice: TokenChoice | None = PrivateAttr(default=None)
    # Modules calibrated and not yet pruned, in the order they first calibrated.
    _accumulators: dict[torch.nn.Module, SelectionAccumulator] = PrivateAttr(default_factory=dict)
    _checked_ranks: bool = PrivateAttr(default=False)
    _layer_rows: dict[str, dict] = PrivateAttr(default_factory=dict)
    _seconds: dict[str, float] = PrivateAttr(default_factory=lambda: {"selection": 0.0, "statistics": 0.0,
                                                                          "pruning": 0.0})

    @field_validator("token_selection", "reconstruction", "scope", "token_weighting")
    @classmethod
    def _check_choice(cls, value: str, info) -> str:
        choices = {"token_selection": TOKEN_SELECTIONS, "reconstruction": RECONSTRUCTIONS, "scope": SCOPES,
                   "token_weighting": TOKEN_WEIGHTINGS}
        return one_of(info.field_name, value, choices[info.field_name])

    @field_validator("mask_structure")
    @classmethod
    def _check_structure(cls, value: str) -> str:
        parse_mask_structure(value)
        return value

    @field_validator("targets", mode="before")
    @classmethod
    def _listify(cls, value):
        # A bare "Linear" prunes nothing; anything but a string or a sequence is pydantic's to refuse.
        return as_list(value) if isinstance(value, (str, list, tuple)) else value

    @model_validator(mode="after")
    def _check_fields(self) -> "AdaptiveInputActivation":
        if self.sparsity_profile is not None:
            raise ValueError(
                "AdaptiveInputActivation takes per-layer ratios from DiversityAwareSparsity "
                "placed before it; sparsity_profile is not supported"
            )
        if isinstance(self.sparsity, float):  # a list is per layer, None is DAS's
            in_range("sparsity", self.sparsity, 0, 1)
        at_least("knn", self.knn, 0)
        at_least("random_tokens", self.random_tokens, 1)
        above("mmd_scale", self.mmd_scale, 0)
        at_least("selected_weight", self.selected_weight, 1,
                 why="the selected tokens' weight against 1 for the others")
        at_least("block_size", self.block_size, 1)
        at_least("dampening_frac", self.dampening_frac or 0, 0)
        return self

    def set_layer_sparsity(self, ratios: dict[str, float]) -> None:
        """Per-layer ratios by module name (DiversityAwareSparsity's, through ``set_layer_ratios``)."""
        self._layer_sparsity = dict(ratios)

    # LayerRatioPruner (modifiers/ratio_handover.py) and PatternCheckingStep
    # (modifiers/pattern_check.py), natively.
    @property
    def pruning_step(self) -> "AdaptiveInputActivation":
        return self  # it prunes itself

    @property
    def checks_sparsity_pattern(self) -> bool:
        return True  # on_finalize runs check_pattern_kept

    @property
    def data_parallel(self) -> bool:
        return True  # compress_modules sums every rank's statistics

    def pruned_modules(self, model: torch.nn.Module) -> list[str]:
        return list(pruned_by_targets(model, self.targets, self.ignore))

    def set_layer_ratios(self, model: torch.nn.Module, allocated: dict[str, float],
                         assigned: dict[str, float]) -> dict[str, float]:
        self.set_layer_sparsity(assigned)  # by module name: no target list to fit
        return dict(assigned)

    def restore(self) -> None:
        pass  # the ratios live beside ``sparsity``, which keeps its recipe value

    @property
    def _needs_attention(self) -> bool:
        return self.token_selection in ("amia", "attention")

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        if self.scope == "text_decoder":
            confine_to_text_decoder(self, state.model)
        super().on_initialize(state, **kwargs)
        token_ids = resolve_modality_token_ids(state.model.config, self.modality_token_ids)
        self._labels = CalibrationTokenLabels(token_ids)
        self._modalities = ["text", *token_ids]
        self._statistic = (TokenHessians(self.block_size, self.dampening_frac or 0.0)
                           if self.reconstruction == "sparsegpt" else ChannelNorms())
        self._choice = TokenChoice(self.token_selection, knn=self.knn, gamma=self.gamma,
                                   penalty_gamma=self.penalty_gamma, mmd_scale=self.mmd_scale,
                                   random_tokens=self.random_tokens)
        warn_pattern_breaking_steps(self)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)  # hooks on every pruned Linear
        model = state.model
        blocks = self._blocks(model)
        for module, name in self._module_names.items():
            owners = [b for b in blocks if name.startswith(b + ".")]
            self._block_of[module] = max(owners, key=len) if owners else ""
        outside = sorted(name.rstrip(".") for module, name in self._module_names.items()
                         if not self._block_of[module])
        if outside:
            raise ValueError(
                f"AdaptiveInputActivation would prune {len(outside)} Linears outside every decoder layer "
                f"({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}): it reads each decoder "
                "block's tokens and attention, so it prunes Linears inside the text decoder's layers only. "
                "Use scope: text_decoder (the default), or add them to ignore"
            )
        used = {b for b in self._block_of.values() if b}
        self._labels.attach(self, model, [model.get_submodule(b) for b in used])
        if self._needs_attention:
            for block in used:
                attn = getattr(model.get_submodule(block), "self_attn", None)
                if attn is None:
                    raise ValueError(
                        f"decoder block {block} has no `self_attn` module, so AMIA has no "
                        "attention to select tokens with; use token_selection: all or random"
                    )
                self.register_hook(attn, self._attention_hook(block), "forward")

    def on_finalize(self, state: State, **kwargs) -> bool:
        result = super().on_finalize(state, **kwargs)
        self.remove_hooks()
        self._attach_section(state.model)
        check_pattern_kept(self, state.model)
        self._labels = None
        check_every_target_pruned(
            targets=[name.rstrip(".") for name in self._module_names.values()], pruned=self._layer_rows,
            calibrated=[self._module_names[m].rstrip(".") for m in self._accumulators],
        )
        return result

    def _blocks(self, model: torch.nn.Module) -> list[str]:
        return [name for name, _ in match_named_modules(model, self._sequential_targets)]

    # ------------------------------------------------------------------ hooks

    def _attention_hook(self, block: str):
        def hook(_module, _args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(
                    f"{block}.self_attn returned no attention weights: AMIA reads each "
                    "block's own attention, which needs eager attention (llm-compressor "
                    "forces it during calibration unless the model cannot use it). Load the "
                    "model with attn_implementation='eager', or use token_selection: all/random"
                )
            batch = active_session().state.current_batch_idx
            labels = self._labels.current(weights.shape[:1] + weights.shape[-1:])
            self._attention[block] = (batch, last_query_attention(weights, labels))
            for args in self._pending.pop(block, []):
                self._accumulate(*args)

        return hook

    def calibrate_module(self, module: torch.nn.Module, args: tuple, output: torch.Tensor):
        inputs, outputs = args[0].detach(), output.detach()
        block = self._block_of.get(module, "")
        if self._needs_attention:
            batch = active_session().state.current_batch_idx
            seen = self._attention.get(block)
            if seen is None or seen[0] != batch:
                # q/k/v run inside self_attn, before its attention is returned.
                self._pending.setdefault(block, []).append((module, inputs, outputs))
                return
        self._accumulate(module, inputs, outputs)

    def _accumulate(self, module, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        labels = self._labels.current(inputs.shape[:-1])
        attention = self._attention[self._block_of[module]][1] if self._needs_attention else None
        seeds = None
        if self.token_selection == "random":
            name, samples = self._module_names[module], 1 if inputs.dim() == 2 else inputs.shape[0]
            seeds = [random_selection_seed(self.seed, name, self._labels.fingerprint(b))
                     for b in range(samples)]
        if module not in self._accumulators:
            self._accumulators[module] = self._new_accumulator()
        start, on_statistics = time.perf_counter(), 0.0

        def add_rows(rows: torch.Tensor, token_weight: float) -> None:
            nonlocal on_statistics
            picked = time.perf_counter()
            self._statistic.add(module, rows, token_weight)
            on_statistics += time.perf_counter() - picked

        self._accumulators[module].update(inputs, outputs, labels, attention, add_rows, seeds)
        self._seconds["statistics"] += on_statistics
        self._seconds["selection"] += time.perf_counter() - start - on_statistics

    def _new_accumulator(self) -> SelectionAccumulator:
        return SelectionAccumulator(len(self._modalities), self._choice, self.token_weighting,
                                    self.selected_weight)

    # ------------------------------------------------------------------ pruning

    def compress_modules(self):
        start = time.perf_counter()
        modules = self._calibrated_modules()
        # Under torchrun each result is computed once, by the rank that owns its
        # module (GPTQ's bin packing by size), then broadcast (results_from_owners).
        owner = assign_to_ranks(modules, [m.weight.numel() for m in modules])
        self._reduce_across_ranks(modules, owner)
        results = results_from_owners(modules, owner, self._result, self._statistic.result_dtype)
        for module, result in results:
            self._write(module, result, owner[module])
            self._layer_rows[self._module_names[module].rstrip(".")] = self._layer_row(module, owner[module])
        barrier()  # owners' writes to offload shared between ranks land before anyone reads it
        self._seconds["pruning"] += time.perf_counter() - start

    def _calibrated_modules(self) -> list[torch.nn.Module]:
        """The modules this subgraph calibrated; in distributed runs, on any rank, in one order."""
        if not is_distributed():
            return list(self._accumulators)
        by_name = {name: module for module, name in self._module_names.items()}
        names = union_across_ranks([self._module_names[m] for m in self._accumulators])
        return [by_name[n] for n in names]

    def _reduce_across_ranks(self, modules: list[torch.nn.Module], owner: dict) -> None:
        """Sum each module's statistic (onto its owner, or everywhere) and token counts over the ranks."""
        if not is_distributed():
            return
        for module in modules:  # a rank may have had no sample reach a module
            if module not in self._accumulators:
                self._statistic.empty(module)
                self._accumulators[module] = self._new_accumulator()
        self._statistic.reduce_across_ranks(modules, owner)
        accumulators = [self._accumulators[module] for module in modules]
        reduced = iter(sum_across_ranks([a.selected for a in accumulators] + [a.seen for a in accumulators]))
        for a in accumulators:
            a.selected = next(reduced)
        for a in accumulators:
            a.seen = next(reduced)

    def _result(self, module: torch.nn.Module) -> torch.Tensor:
        """What the owner rank computes: Wanda's mask, or SparseGPT's new weight."""
        return self._statistic.result(module, self._sparsity(module), self._prune_n, self._prune_m)

    def _layer_row(self, module: torch.nn.Module, owner: int) -> dict:
        """The module's report row; frees its statistic and counts."""
        kept = self._statistic.drop(module)
        if is_distributed() and isinstance(self._statistic, TokenHessians):
            kept = broadcast_object(kept, src=owner)  # the owner's loss, in every rank's report
        counts = self._accumulators.pop(module)
        return amia_layer_row(None if self._prune_n else self._sparsity(module), self.mask_structure,
                              self._modalities, counts.selected.tolist(), counts.seen.tolist(), kept)

    def _sparsity(self, module: torch.nn.Module) -> float:
        """The module's ratio: DAS's when a DAS ran before, else this modifier's."""
        name = self._module_names[module].rstrip(".")
        return self._layer_sparsity.get(name, self._module_sparsities[module])

    def _write(self, module: torch.nn.Module, result: torch.Tensor, owner: int) -> None:
        """Write the pruned weight on this rank, writing shared storage only once."""
        weight = module.weight
        new = self._statistic.new_weight(weight.data, result)
        if shares_offload(module) and rank() != owner:
            # The owner writes the offload all ranks share; here only a private
            # onloaded copy (a GPU's) needs the same weight.
            if weight.data_ptr() != module._parameters.offloaded_values["weight"].data_ptr():
                weight.data.copy_(new)
            return
        update_offload_parameter(module, "weight", new)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        if any_rank(bool(self._pending)):  # decided together: a rank raising alone hangs the rest
            blocks = sorted(self._pending) or "of another rank"
            raise RuntimeError(f"attention never arrived for blocks {blocks}")
        self._attention.clear()
        if not self._checked_ranks:  # after the first subgraph: before the long work
            self._checked_ranks = True
            self._labels.check_ranks_distinct()
        super().on_sequential_epoch_end(state, event, **kwargs)

    def _attach_section(self, model: torch.nn.Module) -> None:
        """AMIA's report section on the model (saved with it), and its summary in the log."""
        if not self._layer_rows:
            return
        section = amia_section(
            self._layer_rows, self._modalities, token_selection=self.token_selection,
            reconstruction=self.reconstruction, token_weighting=self.token_weighting,
            mask_structure=self.mask_structure,
            settings={"knn": self.knn, "gamma": self.gamma, "penalty_gamma": self.penalty_gamma,
                      "mmd_scale": self.mmd_scale, "random_tokens": self.random_tokens, "seed": self.seed,
                      "selected_weight": self.selected_weight, "block_size": self.block_size,
                      "dampening_frac": self.dampening_frac},
            from_das=bool(self._layer_sparsity), ranks=world_size(), seconds=self._seconds,
        )
        attach_section(model, "amia", section)
        install_save_hook(model)
        text = ", ".join(f"{m} {s:.1%}" for m, s in section["selected_share"].items() if s is not None)
        logger.info(f"AdaptiveInputActivation ({self.token_selection}, {self.reconstruction}): share of "
                    f"tokens selected: {text}; "
                    f"selection {self._seconds['selection']:.1f} s, statistics "
                    f"{self._seconds['statistics']:.1f} s, pruning {self._seconds['pruning']:.1f} s")


def check_every_target_pruned(targets: Iterable[str], pruned: Iterable[str],
                              calibrated: Iterable[str]) -> None:
    """Raise if a target Linear was left dense at the end of the run.

    :param targets: every Linear AMIA was to prune
    :param pruned: those it pruned (the report's rows)
    :param calibrated: those that calibrated and were not pruned since (statistics still held)
    """
    pruned = set(pruned)
    unpruned = [name for name in targets if name not in pruned]
    if not unpruned:
        return
    stranded = set(calibrated)

    def few(names: list[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")

    calibrated_only = [name for name in unpruned if name in stranded]
    if calibrated_only:
        raise RuntimeError(
            f"AdaptiveInputActivation calibrated {len(calibrated_only)} target Linears but never pruned them "
            f"({few(calibrated_only)}): their subgraph's calibration never ended (no sequential epoch end "
            "reached compress_modules); run them through llm-compressor's sequential or basic pipeline"
        )
    raise RuntimeError(
        f"AdaptiveInputActivation left {len(unpruned)} target Linears dense ({few(unpruned)}): no "
        "calibration sample reached them (a branch the forward pass never took, e.g. an MoE expert no "
        "token was routed to); calibrate with samples that reach them, or add them to ignore"
    )
