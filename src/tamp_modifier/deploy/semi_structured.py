"""Run 2:4-pruned Linears on NVIDIA GPUs with torch's semi-structured sparse tensors.

A weight is 2:4 when every group of 4 consecutive weights along a row (the
input dimension of an ``nn.Linear``) holds at least 2 zeros. Ampere and newer
NVIDIA GPUs multiply such a matrix with sparse tensor cores, through
``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt, or CUTLASS on Ampere).
This module decides which Linears can take that path and swaps their weights::

    model = model.to("cuda", torch.float16)
    report = to_semi_structured(model)          # every 2:4 Linear of the language model
    print(report.format_table())                # converted, skipped (and why), parameter shares

It works in two steps. ``plan`` is pure bookkeeping and needs no GPU: it finds
the candidate Linears, measures their 2:4 share, checks dtype and shape against
the kernels' constraints, and raises before any work when something asked for
cannot be done. ``apply_plan`` needs a CUDA device and replaces the planned
weights. ``to_semi_structured`` checks the device, then runs both.

The converted model is for inference on its GPU: torch's sparse weights cannot
be saved with ``save_pretrained``, cast with ``.to(dtype)``, or moved to
another GPU. Convert after loading, as the last step.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from tamp_modifier.pruning.sparsity_pattern import nm_share
from tamp_modifier.text_decoder import language_linears
from tamp_modifier.validation import as_list, one_of

__all__ = [
    "ConversionPlan",
    "LayerRecord",
    "SUPPORTED_DTYPES",
    "apply_plan",
    "is_2_of_4",
    "plan",
    "resolve_backend",
    "shape_constraint",
    "to_semi_structured",
]

# float32 is left out on purpose: cuSPARSELt has no float32 kernels, and CUTLASS's
# float32 "2:4" is really 1:2 on pairs, a different pattern from the one we prune.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

BACKENDS = ("auto", "cusparselt", "cutlass")

# Copies of torch 2.13's (sparse_min_rows, sparse_min_cols) per backend, used only if
# torch stops exposing _DTYPE_SHAPE_CONSTRAINTS: both dimensions of the weight must
# be at least, and a multiple of, these.
_FALLBACK_MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}

_PROTOTYPE_WARNING = "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"


# ----------------------------------------------------------------------------- the pattern


def is_2_of_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive weights along a row has at least 2 zeros.

    >>> is_2_of_4(torch.tensor([[0., 1., 0., 2.]]))
    True
    """
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return True  # only 2:4 weights are ever converted
    return weight.dim() == 2 and weight.shape[-1] % 4 == 0 and nm_share(weight.detach(), 2, 4) == 1.0


# ----------------------------------------------------------------------------- kernels' constraints


def _sparse_class(backend: str):
    if backend == "cusparselt":
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if backend == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    raise ValueError(f"backend must be 'cusparselt' or 'cutlass' here, got {backend!r}")


def shape_constraint(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, columns)``: a weight's dimensions must be at least, and a multiple of, these.

    Read from torch's own class (the numbers it validates with), so this follows
    the installed torch. torch 2.13: cuSPARSELt (16, 16), CUTLASS (32, 64) for
    float16 and bfloat16.
    """
    _check_dtype(dtype)
    table = getattr(_sparse_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None)
    if table is not None and dtype in table:
        return int(table[dtype].sparse_min_rows), int(table[dtype].sparse_min_cols)
    return _FALLBACK_MIN_SHAPE[backend][dtype]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"2:4 semi-structured kernels need float16 or bfloat16 weights and activations, got {dtype}. "
            "Pass dtype=torch.float16 (or torch.bfloat16) to cast the whole model, or load it with "
            "from_pretrained(..., dtype=torch.float16)."
        )


def resolve_backend(
    backend: str,
    device: torch.device | str,
    *,
    capability: tuple[int, int] | None = None,
    cusparselt_available: bool | None = None,
    hip: bool | None = None,
) -> str:
    """The backend to use on ``device``, or an error saying why the device cannot run 2:4 kernels.

    ``auto`` picks cuSPARSELt when torch has it, else CUTLASS. torch's CUTLASS
    2:4 kernels are built for Ampere (compute capability 8.x) only. The keyword
    arguments default to what torch reports for ``device``; tests pass them to
    describe a device that is not there.

    >>> resolve_backend("auto", "cuda:0", capability=(9, 0), cusparselt_available=True, hip=False)
    'cusparselt'
    """
    one_of("backend", backend, BACKENDS)
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(
            f"2:4 semi-structured sparse matmuls run only on NVIDIA GPUs (CUDA); the model is on "
            f"{device}. Move it first: model.to('cuda', torch.float16). On CPU a 2:4 model runs "
            "through the dense kernels, at dense speed."
        )
    hip = torch.version.hip is not None if hip is None else hip
    if hip:
        raise RuntimeError(
            "this conversion supports NVIDIA GPUs (CUDA builds of torch) only; this torch is a ROCm build"
        )
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"the model is on {device} but torch.cuda.is_available() is False: install a CUDA build "
                "of torch and run on an NVIDIA GPU"
            )
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < (8, 0):
        raise RuntimeError(
            f"2:4 sparse tensor cores need an Ampere or newer NVIDIA GPU (compute capability >= 8.0); "
            f"{device} has {capability[0]}.{capability[1]}. Run the dense model on this GPU, or use an "
            "A100/A10/L4/L40/H100/H200-class GPU."
        )
    if cusparselt_available is None:
        cusparselt_available = torch.backends.cusparselt.is_available()
    if backend == "auto":
        backend = "cusparselt" if cusparselt_available else "cutlass"
    if backend == "cusparselt" and not cusparselt_available:
        raise RuntimeError(
            "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False); "
            "pass backend='cutlass' (Ampere only) or install a CUDA wheel of torch from pytorch.org"
        )
    if backend == "cutlass" and capability[0] != 8:
        raise RuntimeError(
            f"torch's CUTLASS 2:4 kernels are built for Ampere (compute capability 8.x) only; {device} has "
            f"{capability[0]}.{capability[1]}. Use backend='cusparselt' (a torch build with cuSPARSELt)."
        )
    if capability[0] > 9:
        warnings.warn(
            f"compute capability {capability[0]}.{capability[1]}: torch's own 2:4 tests cover 8.x and 9.x "
            "only; check the outputs (the tests in tests/test_semi_structured.py do) before relying on it",
            stacklevel=2,
        )
    return backend


# ----------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class LayerRecord:
    """One Linear: name, weight shape and count, 2:4 share, whether it belongs to the
    language model, and why it was skipped (``None`` when converted)."""

    name: str
    shape: tuple[int, int]
    params: int
    language: bool
    share_2_of_4: float | None = None  # None when not measured (not a candidate, or not groupable by 4)
    reason: str | None = None


@dataclass
class ConversionPlan:
    """What ``plan`` decided and ``apply_plan`` did.

    ``language_params`` counts the weights of the language model's Linears (those
    the shipped recipes prune: vision tower, projector and ``lm_head`` excluded);
    ``converted_share`` is the part of it that runs on sparse kernels.

    >>> report = plan(model, backend="cusparselt", dtype=torch.float16)  # doctest: +SKIP
    >>> report.converted_share, [r.name for r in report.skipped]          # doctest: +SKIP
    """

    backend: str
    dtype: str
    converted: list[LayerRecord] = field(default_factory=list)
    skipped: list[LayerRecord] = field(default_factory=list)
    language_params: int = 0
    applied: bool = False

    @property
    def converted_params(self) -> int:
        """Weights converted, inside or outside the language model."""
        return sum(r.params for r in self.converted)

    @property
    def converted_language_params(self) -> int:
        return sum(r.params for r in self.converted if r.language)

    @property
    def converted_share(self) -> float:
        """Share of the language model's Linear weights that are converted (0 when it has none)."""
        return self.converted_language_params / self.language_params if self.language_params else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (shapes as lists)."""

        def rows(records):
            return [{**asdict(r), "shape": list(r.shape)} for r in records]

        return {
            "backend": self.backend,
            "dtype": self.dtype,
            "applied": self.applied,
            "converted": rows(self.converted),
            "skipped": rows(self.skipped),
            "converted_params": self.converted_params,
            "converted_language_params": self.converted_language_params,
            "language_params": self.language_params,
            "converted_share": self.converted_share,
        }

    def format_table(self) -> str:
        """Plain-text table: one line per Linear, then the totals."""
        lines = [f"{'layer':<60} {'shape':>13} {'params':>11} {'2:4':>7}  status"]
        rows = [(r, "converted") for r in self.converted]
        rows += [(r, f"skipped: {r.reason}") for r in self.skipped]
        for record, status in rows:
            share = "-" if record.share_2_of_4 is None else f"{100 * record.share_2_of_4:.1f}%"
            shape = "x".join(str(s) for s in record.shape)
            lines.append(f"{record.name:<60} {shape:>13} {record.params:>11,} {share:>7}  {status}")
        lines.append(
            f"{len(self.converted)} Linears converted ({self.backend}, {self.dtype}), "
            f"{len(self.skipped)} skipped; {self.converted_language_params:,} of {self.language_params:,} "
            f"language-model Linear weights ({100 * self.converted_share:.1f}%)"
        )
        return "\n".join(lines)




def _candidates(model, targets, ignore) -> tuple[dict[str, torch.nn.Linear], bool]:
    """The Linears to consider, and whether the user named them (then every one must convert)."""
    from compressed_tensors.utils import match_named_modules

    ignore = as_list(ignore) or []
    if targets is None:
        language = language_linears(model)
        matched = match_named_modules(model, ["Linear"], ignore)
        return {n: m for n, m in matched if n in language}, False
    targets = as_list(targets) or []
    # A name pattern such as "re:.*mlp.*" also matches the MLP blocks that hold the Linears:
    # only the Linears it matches are candidates.
    matches = match_named_modules(model, targets, ignore)
    matched = {n: m for n, m in matches if isinstance(m, torch.nn.Linear)}
    if not matched:
        raise ValueError(
            f"targets={targets} with ignore={ignore} match no nn.Linear of {type(model).__name__}; "
            'use "Linear" or "re:" name patterns such as "re:.*mlp.*"'
        )
    return matched, True


def _layer_problem(weight: torch.Tensor, min_shape: tuple[int, int]) -> tuple[str | None, float | None]:
    """(why this weight cannot be converted, or None; its 2:4 share, or None if not measurable)."""
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return "already converted to a semi-structured sparse weight", None
    if weight.is_meta:
        return "weights not loaded (meta device, e.g. offloaded): load the model fully on the GPU", None
    rows, cols = weight.shape
    min_rows, min_cols = min_shape
    share = nm_share(weight.detach(), 2, 4) if cols % 4 == 0 else None
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return (
            f"shape {rows}x{cols}: the kernels need both dimensions (out x in) to be at least and a "
            f"multiple of {min_rows}x{min_cols}",
            share,
        )
    if share != 1.0:
        return f"not 2:4 ({100 * share:.1f}% of its 4-groups are 2:4)", share
    return None, share


def _model_dtype(candidates: dict[str, torch.nn.Linear], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        _check_dtype(dtype)
        return dtype
    dtypes = {m.weight.dtype for m in candidates.values()}
    bad = sorted(str(d) for d in dtypes if d not in SUPPORTED_DTYPES)
    if bad:
        raise ValueError(
            f"the Linears to convert have {', '.join(bad)} weights; 2:4 semi-structured kernels need "
            "float16 or bfloat16. Pass dtype=torch.float16 (or torch.bfloat16) to cast the whole "
            "model, or load it with from_pretrained(..., dtype=torch.float16)."
        )
    if len(dtypes) > 1:
        raise ValueError(
            f"the Linears to convert mix dtypes {sorted(map(str, dtypes))}: pass dtype= to cast the model"
        )
    return next(iter(dtypes)) if dtypes else torch.float16


def plan(
    model: torch.nn.Module,
    *,
    targets: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "cusparselt",
) -> ConversionPlan:
    """Decide which Linears convert, on any device; raises before any work on what cannot be done.

    :param targets: ``None`` (default): every Linear of the language model (vision
        tower, projector and ``lm_head`` stay dense, as the shipped recipes prune);
        those that are not 2:4, or whose shape the kernels cannot take, are skipped
        and recorded. Given (class names or ``re:`` patterns, llm-compressor's
        matching; only the Linears among the matches count): every one must
        convert, else ``ValueError`` naming each offender and how much of it is 2:4.
    :param ignore: patterns left out (added to the tower patterns when ``targets`` is None)
    :param dtype: the dtype the model will run in (``apply_plan`` casts the whole model
        to it); ``None``: the weights' own dtype, which must be float16 or bfloat16
    :param backend: ``cusparselt`` (default; the CUDA wheels ship it) or ``cutlass``
        (Ampere only): their shape limits differ. ``auto`` resolves with this torch
        build: cuSPARSELt if it has it, else CUTLASS.

    >>> report = plan(model, dtype=torch.float16)   # doctest: +SKIP
    >>> print(report.format_table())                # doctest: +SKIP
    """
    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    _sparse_class(backend)
    candidates, explicit = _candidates(model, targets, ignore)
    dtype = _model_dtype(candidates, dtype)
    quantized = [n for n, m in candidates.items() if getattr(m, "quantization_scheme", None) is not None]
    if quantized:
        raise ValueError(
            f"{len(quantized)} Linears carry a compressed-tensors quantization scheme "
            f"(first: {quantized[0]}); "
            "semi-structured conversion takes unquantized float16/bfloat16 models. Convert the model "
            "pruned but not quantized, or serve the quantized one with vLLM's dense kernels."
        )
    min_shape = shape_constraint(backend, dtype)
    language = language_linears(model)
    report = ConversionPlan(
        backend=backend,
        dtype=str(dtype).removeprefix("torch."),
        language_params=sum(m.weight.numel() for m in language.values()),
    )
    refused = []
    for name, module in candidates.items():
        problem, share = _layer_problem(module.weight, min_shape)
        record = LayerRecord(
            name, tuple(module.weight.shape), module.weight.numel(), name in language, share, problem
        )
        if problem is None:
            report.converted.append(record)
        elif explicit:
            refused.append(f"{name}: {problem}")
        else:
            report.skipped.append(record)
    if refused:
        raise ValueError(
            f"{len(refused)} targeted Linear(s) cannot run on 2:4 kernels ({backend}, {report.dtype}):\n  "
            + "\n  ".join(refused)
            + "\nPrune them 2:4 first (recipe tamp_2of4, or mask_structure: '2:4'), or leave them out of "
            "targets; with targets=None, layers that cannot convert are skipped and listed instead."
        )
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in candidates:
            if targets is not None:
                reason = "not targeted"
            elif name in language:
                reason = "matched by ignore"
            else:
                reason = "outside the language model (kept dense)"
            weight = module.weight
            report.skipped.append(
                LayerRecord(name, tuple(weight.shape), weight.numel(), name in language, None, reason)
            )
    return report


# ----------------------------------------------------------------------------- the GPU step


def apply_plan(model: torch.nn.Module, report: ConversionPlan) -> ConversionPlan:
    """Replace the weights ``report`` lists as converted by semi-structured sparse tensors, in place.

    Needs the model on an NVIDIA GPU (Ampere or newer). Casts the whole model to
    the report's dtype first (activations must match the sparse weights' dtype).
    Every layer is checked again before any weight is replaced, so a plan made
    for another model, or before the weights changed, is refused rather than
    silently corrupting outputs (the kernels assume 2:4 and drop extra non-zeros).

    >>> report = apply_plan(model.cuda(), plan(model, dtype=torch.float16))  # doctest: +SKIP
    """
    if report.applied:
        raise RuntimeError("this plan has already been applied; call plan() again for another model")
    dtype = getattr(torch, report.dtype)
    layers = {}
    for record in report.converted:
        try:
            module = model.get_submodule(record.name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"the plan names {record.name}, which is not a Linear of this model: call plan() again"
            )
        if isinstance(module.weight, torch.sparse.SparseSemiStructuredTensor):
            raise ValueError(f"{record.name} is already converted: call plan() again on the model as it is")
        layers[record.name] = (module, record)
    for device in {p.device for p in model.parameters()}:
        resolve_backend(report.backend, device)  # raises when this device cannot run the plan's backend
    min_shape = shape_constraint(report.backend, dtype)
    stale = []
    for name, (module, record) in layers.items():
        problem, _ = _layer_problem(module.weight, min_shape)
        if tuple(module.weight.shape) != tuple(record.shape):
            problem = f"shape {tuple(module.weight.shape)} is not the planned {tuple(record.shape)}"
        if problem is not None:
            stale.append(f"{name}: {problem}")
    if stale:
        raise ValueError(
            f"the model changed since plan(): {'; '.join(stale[:5])}. Call plan() on the model as it is now."
        )
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    sparse_class = _sparse_class(report.backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PROTOTYPE_WARNING)
        for name, (module, _) in layers.items():
            dense = module.weight.detach().contiguous()
            try:
                sparse = sparse_class.from_dense(dense)
            except RuntimeError as error:
                raise RuntimeError(f"torch could not convert {name} {tuple(dense.shape)}: {error}") from error
            # Replacing the Parameter frees the dense copy: peak memory grows by one layer only.
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
    report.applied = True
    return report


def to_semi_structured(
    model: torch.nn.Module,
    *,
    targets: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> ConversionPlan:
    """Convert every 2:4-pruned Linear of a GPU-resident model to semi-structured sparse weights.

    Refuses, before any work: CPU and non-NVIDIA or pre-Ampere GPUs, dtypes
    other than float16/bfloat16 (pass ``dtype=`` to cast), and targeted layers
    that are not 2:4 or whose shapes the kernels cannot take. See ``plan`` for
    ``targets``, ``ignore``, ``dtype`` and ``backend``. Returns the report, with
    ``applied`` True.

    >>> model = model.to("cuda", torch.float16)      # doctest: +SKIP
    >>> report = to_semi_structured(model)          # doctest: +SKIP
    >>> report.converted_share                      # doctest: +SKIP
    1.0
    """
    for device in sorted({p.device for p in model.parameters()}, key=str):
        backend = resolve_backend(backend, device)
    report = plan(model, targets=targets, ignore=ignore, dtype=dtype, backend=backend)
    return apply_plan(model, report)
