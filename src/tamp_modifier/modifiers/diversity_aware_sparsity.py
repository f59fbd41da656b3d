"""DiversityAwareSparsity: per-layer sparsity from output-token diversity."""

from __future__ import annotations

import math

import torch
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from tamp_modifier.deploy.save_hook import install_save_hook
from tamp_modifier.modifiers.das_across_ranks import (
    samples_across_ranks,
    sum_accumulators_across_ranks,
    tokens_across_ranks,
)
from tamp_modifier.modifiers.das_targets import (
    adopted_sparsity,
    check_data_parallel,
    check_scopes_agree,
    decoder_blocks,
    scored_modules,
)
from tamp_modifier.modifiers.distributed import any_rank, broadcast_object, world_size
from tamp_modifier.modifiers.pattern_check import check_pattern_kept, warn_pattern_breaking_steps
from tamp_modifier.modifiers.ratio_handover import LayerRatioPruner, check_pruner, following_pruner
from tamp_modifier.modifiers.scope import SCOPES, confine_to_text_decoder
from tamp_modifier.modifiers.single_pass_pipeline import ObservedPipelineRun
from tamp_modifier.modifiers.token_labels import CalibrationTokenLabels
from tamp_modifier.pruning.allocation import (
    ALLOCATIONS,
    GRANULARITIES,
    allocate_by_granularity,
    check_sparsity_bounds,
    snap_to_rows,
)
from tamp_modifier.pruning.diversity import DiversityAccumulator, term_names
from tamp_modifier.pruning.modality import resolve_modality_token_ids
from tamp_modifier.report.saved import REPORT_FILE_NAME, load_report
from tamp_modifier.report.sections import attach_section, das_section
from tamp_modifier.report.tables import format_table
from tamp_modifier.validation import as_list, at_least, one_of

__all__ = ["DiversityAwareSparsity"]

DIVERSITY_MODES = ("modality", "all_tokens")


class DiversityAwareSparsity(Modifier):
    """Diversity-Aware Sparsity (DAS), the layer-wise half of TAMP.

    Runs a calibration pass on the dense model, scores every target Linear by how
    diverse its output tokens are (within each modality and across modalities),
    and turns the scores into per-layer sparsity ratios that meet a global,
    parameter-weighted target. The pruning modifier placed after it in the same
    recipe (``WandaPruningModifier``, ``SparseGPTModifier`` or
    ``AdaptiveInputActivation``) then prunes each layer at its ratio. Alone, it is
    a profiling run: nothing is pruned and the scores are reported.

    Lifecycle:

    - on_initialize: find the pruner after it (``ratio_handover.LayerRatioPruner``),
      agree with it on one sparsity, scope and set of Linears (``das_targets``)
    - on_calibration_start: one pass per subgraph (``single_pass_pipeline``),
      token labels, a forward hook per scored Linear
    - forward hook (per sample): add the output tokens to the layer's
      ``DiversityAccumulator``
    - on_sequential_epoch_end: stop early on bad data (non-finite outputs,
      declared modalities absent)
    - on_calibration_end: sum over ranks (``das_across_ranks``), score, allocate
      (``pruning.allocation``), hand the ratios to the pruner, attach the report
      section (``report.sections.das_section``)
    - on_finalize: the pruner puts its recipe fields back (``restore``), the pattern check

    Scores, terms and ratios are written to ``tamp_report.json`` next to the saved
    model; ``tamp_modifier.reallocate`` or the ``profile`` field reuse them for
    another target without calibrating again.

    Sample yaml (``import tamp_modifier`` first, or use ``tamp-prune``)::

        sparsity_stage:
          sparsity_modifiers:
            DiversityAwareSparsity:
              allocation: ecoflap
              max_delta: 0.1
            WandaPruningModifier:
              sparsity: 0.5
              targets: ["Linear"]
              ignore: ["re:.*vision_tower.*", "re:.*multi_modal_projector.*",
                       "re:.*visual.*", "re:.*lm_head"]

    :param sparsity: global target; None takes the following pruner's
    :param allocation: ``ecoflap`` (default) or ``proportional``
    :param max_delta: a layer's sparsity stays within ``sparsity + max_delta``
        (and, for ``proportional``, above ``sparsity - max_delta``)
    :param diversity: ``modality`` (intra- and inter-modality terms, default) or
        ``all_tokens`` (one term over all tokens)
    :param granularity: ``layer`` (default) or ``block`` (one ratio per decoder block)
    :param modality_token_ids: ``{image: [ids], video: [...], ...}``; default: the
        placeholder ids in the model config
    :param targets: modules to score; None takes the modules the following pruner
        prunes (``["Linear"]`` for a profiling run)
    :param ignore: patterns to leave out; None: as ``targets``
    :param profile: path of a saved ``tamp_report.json`` (or its model folder):
        reuse its scores instead of calibrating
    :param profile_samples: score on the first this many calibration samples
        only (None: all of them); the pruner after it still uses every sample
    :param scope: ``text_decoder`` (default): score, and let the pruner after it
        prune, only Linears inside the text decoder's layers, found from the
        model's structure; ``targets``: exactly what the patterns match

    DAS changes no weight, so its calibration runs one forward pass per decoder
    layer and sample, not llm-compressor's two (``single_pass_pipeline``).
    """

    sparsity: float | None = None
    allocation: str = "ecoflap"
    max_delta: float = 0.1
    diversity: str = "modality"
    granularity: str = "layer"
    modality_token_ids: dict[str, list[int]] | None = None
    targets: list[str] | None = None
    ignore: list[str] | None = None
    scope: str = "text_decoder"
    profile: str | None = None
    profile_samples: int | None = None
    requires_calibration_data: bool = Field(default=True)

    _pruner: LayerRatioPruner | None = PrivateAttr(default=None)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _blocks: dict[str, str] = PrivateAttr(default_factory=dict)
    _modalities: list[str] = PrivateAttr(default_factory=list)
    _token_ids: dict[str, list[int]] = PrivateAttr(default_factory=dict)
    _accumulators: dict[str, DiversityAccumulator] = PrivateAttr(default_factory=dict)
    _labels: CalibrationTokenLabels | None = PrivateAttr(default=None)
    _checked_modalities: bool = PrivateAttr(default=False)
    _tokens_seen: dict[str, int] | None = PrivateAttr(default=None)
    _run: ObservedPipelineRun | None = PrivateAttr(default=None)
    _samples_scored: int = PrivateAttr(default=0)

    @field_validator("allocation", "diversity", "granularity", "scope")
    @classmethod
    def _check_choice(cls, value: str, info) -> str:
        choices = {"allocation": ALLOCATIONS, "diversity": DIVERSITY_MODES, "granularity": GRANULARITIES,
                   "scope": SCOPES}
        return one_of(info.field_name, value, choices[info.field_name])

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return as_list(value)

    @model_validator(mode="after")
    def _check_bounds(self) -> "DiversityAwareSparsity":
        if self.sparsity is not None:
            check_sparsity_bounds(self.sparsity, self.max_delta)
        if self.profile_samples is not None:
            at_least("profile_samples", self.profile_samples, 1, why="a number of samples, or null for all")
        if self.profile is not None:
            self.requires_calibration_data = False
        return self

    @property
    def pruner(self) -> LayerRatioPruner | None:
        """The pruner after it in the recipe that takes its ratios (None: a profiling run)."""
        return self._pruner

    @property
    def pruning_step(self) -> Modifier | None:
        """The recipe step that prunes at its ratios (for ``pattern_check``)."""
        return self._pruner.pruning_step if self._pruner is not None else None

    @property
    def checks_sparsity_pattern(self) -> bool:
        return True  # a pattern_check.PatternCheckingStep

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._pruner = following_pruner(active_session().lifecycle.recipe.modifiers, self)
        if self._pruner is not None:
            check_pruner(self._pruner)
            check_data_parallel(self._pruner)
            self.sparsity = adopted_sparsity(self.sparsity, self._pruner)
            check_scopes_agree(self.scope, self._pruner)
            if self.scope == "text_decoder":
                confine_to_text_decoder(self, model, pruner=self._pruner.pruning_step)
        elif self.sparsity is None:
            raise ValueError(
                "DiversityAwareSparsity has no pruning modifier after it and no "
                "sparsity: give it `sparsity` for this profiling run, or add "
                "WandaPruningModifier/SparseGPTModifier/AdaptiveInputActivation after it"
            )
        check_sparsity_bounds(self.sparsity, self.max_delta)

        self._modules = scored_modules(model, self.targets, self.ignore, self.scope, self._pruner)
        self._blocks = decoder_blocks(model, self._modules, kwargs.get("sequential_targets"))
        self._token_ids = resolve_modality_token_ids(model.config, self.modality_token_ids)
        if self.diversity == "all_tokens":
            self._modalities = ["all"]
        else:
            self._modalities = ["text", *self._token_ids]
        if self.profile is not None:
            self._check_profile()
        if self._pruner is None:
            logger.info(
                "DiversityAwareSparsity: no pruning modifier follows it, so this is a "
                "profiling run: nothing is pruned; scores and the ratios for "
                f"sparsity={self.sparsity} go to tamp_report.json when the model is saved"
            )
        warn_pattern_breaking_steps(self)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        running = active_session().lifecycle.recipe.modifiers
        if self._pruner is not None and self._pruner.pruning_step in running:
            raise ValueError(
                "DiversityAwareSparsity must finish its calibration before the pruner "
                "starts, but both share one calibration pipeline. Use "
                "pipeline='independent' (oneshot's default)."
            )
        if self.profile is not None:
            return
        self._run = ObservedPipelineRun(running, (DiversityAwareSparsity,))
        self._run.skip_propagation()
        token_ids = self._token_ids if self.diversity == "modality" else {}
        self._labels = CalibrationTokenLabels(token_ids)
        blocks = {self._blocks[n] for n in self._modules}
        self._labels.attach(self, state.model, [state.model.get_submodule(b) for b in blocks])
        for name, module in self._modules.items():
            self._accumulators[name] = DiversityAccumulator(self._modalities)
            hook = self._make_layer_hook(name)
            self.register_hook(module, hook, "forward")

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        # After each subgraph: stop early on bad data instead of after the last layer.
        # Every check below decides on all ranks' data alike: a rank that raised
        # alone would leave the others waiting in their next collective.
        limit = self._local_sample_limit()
        if limit is not None and self._labels:
            # After the first subgraph (embeddings, towers) every sample's ids are
            # known; the decoder layers need only the samples that are scored.
            self._labels.keep_first(limit)
            if self._run is not None:
                self._run.keep_first_samples(limit)
        if self._labels is not None and not self._checked_modalities:
            self._labels.check_ranks_distinct()
            self._check_modalities_seen()
        bad = [
            n
            for n, acc in self._accumulators.items()
            if acc.sums is not None and not bool(torch.isfinite(acc.sums).all())
        ]
        if any_rank(bool(bad)):
            where = f"{bad[:3]}{' ...' if len(bad) > 3 else ''}" if bad else "layers of another rank"
            raise ValueError(
                f"non-finite (NaN/inf) outputs in {where}"
                " during DAS calibration: check the model's dtype (try float32 or "
                "bfloat16 instead of float16) and the calibration inputs"
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        if self._run is not None:
            self._run.restore()  # before anything can raise: the next pipeline propagates
        if self.profile is None:
            self.on_sequential_epoch_end(state, event)  # last checks
            # Counted now, not at the early modality check: padding is only known
            # once the decoder blocks have run (from their attention masks).
            self._tokens_seen = (tokens_across_ranks(self._labels, self._modalities)
                                 if self.diversity == "modality" else None)
            self._samples_scored = samples_across_ranks(self._labels)
            sum_accumulators_across_ranks([self._accumulators[n] for n in self._modules],
                                          len(term_names(self._modalities)))
            layers = self._layer_scores()
        else:
            layers = self._profile_layers()
        self._allocate(state.model, layers)
        self._labels = None
        self._accumulators.clear()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        self.remove_hooks()
        if self._run is not None:
            self._run.restore()
        if self._pruner is not None:
            self._pruner.restore()  # the saved recipe.yaml reads as written
        check_pattern_kept(self, state.model)
        return True

    # ------------------------------------------------------------------ set-up

    def _check_profile(self) -> None:
        das = load_report(self.profile).get("das") or {}
        missing = sorted(set(self._modules) - set(das.get("layers", {})))
        if missing:
            raise ValueError(
                f"profile {self.profile} has no scores for {len(missing)} layers this run "
                f"prunes (e.g. {missing[:3]}): it was made on another model or with other "
                "targets; calibrate again without `profile`"
            )

    # ------------------------------------------------------------------ hooks

    def _local_sample_limit(self) -> int | None:
        """How many of this rank's samples are scored (None: all).

        Under torchrun each rank scores its first ceil(profile_samples / ranks).
        """
        if self.profile_samples is None:
            return None
        return -(-self.profile_samples // world_size())

    def _make_layer_hook(self, name: str):
        limit = self._local_sample_limit()

        def hook(_module, _args, output):
            # Where the cache could not be shortened, the samples past the limit
            # still run through the layer but are not scored.
            if limit is not None and active_session().state.current_batch_idx >= limit:
                return
            out = output.detach()
            self._accumulators[name].update(out, self._labels.current(out.shape[:-1]))

        return hook

    # ------------------------------------------------------------------ results

    def _check_modalities_seen(self) -> None:
        self._checked_modalities = True
        if self.diversity != "modality":
            return
        seen = tokens_across_ranks(self._labels, self._modalities)
        absent = [m for m, c in seen.items() if c == 0 and m != "text"]
        declared = set(self.modality_token_ids or {})
        if absent and declared & set(absent):
            names = sorted(declared & set(absent))
            raise ValueError(
                f"modality_token_ids declares {names}, but no token with those ids is in "
                f"the calibration data ({seen}); fix the ids or remove them"
            )
        if len(absent) == len(self._modalities) - 1:
            logger.warning(
                "DiversityAwareSparsity: the calibration data has no non-text token "
                f"(looked for {self._token_ids}); layers are scored on text diversity only"
            )

    def _layer_scores(self) -> dict[str, dict]:
        layers = {}
        undefined = []
        for name, acc in self._accumulators.items():
            score = acc.score()
            if math.isnan(score):
                undefined.append(name)
                continue
            terms = {a if a == b else f"{a}|{b}": v for (a, b), v in acc.terms().items()}
            layers[name] = {"score": score, "terms": terms}
        if undefined:
            raise ValueError(
                f"no diversity term is defined for {undefined[:3]}: every calibration "
                "sample reached them with fewer than 2 tokens of any modality. Calibrate "
                "on longer samples."
            )
        return layers

    def _profile_layers(self) -> dict[str, dict]:
        saved = load_report(self.profile)["das"]["layers"]
        return {n: {"score": saved[n]["score"], "terms": saved[n]["terms"]} for n in self._modules}

    def _allocate(self, model: torch.nn.Module, layers: dict[str, dict]) -> None:
        sizes = {n: m.weight.numel() for n, m in self._modules.items()}
        columns = {n: m.weight.shape[1] for n, m in self._modules.items()}
        allocated = allocate_by_granularity(
            scores={n: v["score"] for n, v in layers.items()},
            sizes=sizes,
            blocks=self._blocks,
            sparsity=self.sparsity,
            allocation=self.allocation,
            max_delta=self.max_delta,
            granularity=self.granularity,
        )
        # Every rank computed the same ratios from the same totals; rank 0's are
        # broadcast anyway, so the ranks cannot prune at different ratios.
        allocated = broadcast_object(allocated, src=0)
        assigned = snap_to_rows(allocated, columns)
        if self._pruner is not None:
            assigned = self._pruner.set_layer_ratios(model, allocated, assigned)
        settings = {"sparsity": self.sparsity, "allocation": self.allocation, "max_delta": self.max_delta,
                    "diversity": self.diversity, "granularity": self.granularity,
                    "modality_token_ids": self._token_ids}
        report = das_section(
            settings,
            tokens=self._tokens_seen,
            samples=self._samples_scored if self.profile is None else None,
            ranks=world_size(),
            pruner=type(self.pruning_step).__name__ if self._pruner is not None else None,
            blocks=self._blocks, sizes=sizes, columns=columns, layers=layers,
            allocated=allocated, assigned=assigned,
        )
        attach_section(model, "das", report)
        install_save_hook(model)
        low, high = min(assigned, key=assigned.get), max(assigned, key=assigned.get)
        logger.info(
            f"DiversityAwareSparsity: {len(assigned)} layers, global sparsity "
            f"{report['global']['assigned']:.4f}, from {assigned[low]:.4f} ({low}) to "
            f"{assigned[high]:.4f} ({high}); per-layer table in {REPORT_FILE_NAME} on save"
        )
        logger.debug("DiversityAwareSparsity per-layer ratios:\n" + format_table(report))
