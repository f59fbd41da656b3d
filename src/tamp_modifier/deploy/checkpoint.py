"""Make a saved checkpoint deployable, and measure the sparsity its tensors hold.

Four things go wrong with a pruned (and quantized) vision-language checkpoint
saved by llm-compressor 0.14 and compressed-tensors 0.19:

- transformers 5 loads a CLIP or SigLIP tower by dropping the ``vision_model``
  prefix from its weights and only puts it back on save if the loaded files had
  it. A model built from a config (the demo) or loaded from files saved that
  way is written as ``vision_tower.encoder...``, while vLLM, like every
  checkpoint on the hub, names it ``vision_tower.vision_model.encoder...``
  ("no module or parameter named 'vision_tower.embeddings'").
  ``finalize_checkpoint`` renames such weights in the saved files
  (``checkpoint_names`` gives the names after that rename); transformers loads
  both namings.

- compressed-tensors writes the quantization ``ignore`` list in checkpoint
  naming (``vision_tower.encoder...``, ``language_model.lm_head``) when the
  model was loaded with ``from_pretrained``. vLLM reads that naming, but
  transformers 5 matches the list against its own module names
  (``model.vision_tower...``, ``lm_head``), quantizes the ignored modules on
  reload with no scales, and the logits are NaN; and an entry vLLM cannot
  match leaves that module to be quantized (FP8: ``<pad>`` for every image
  question, a warning only). ``ignore_both_namings`` lists every entry under
  both names, the checkpoint's after the prefix rename above. It also names
  the fused layers vLLM builds from ignored ones (``self_attn.qkv_proj`` from
  ``q_proj``, ``k_proj``, ``v_proj``; ``mlp.gate_up_proj``): vLLM matches a
  fused layer against the list by its shards only where the model class
  declares the fusion (``packed_modules_mapping``), and vLLM 0.32's
  LLaVA-OneVision does not, so it quantized the SigLIP tower's ``qkv_proj``
  and failed at the first image ("mat1 must be a 2D tensor", in
  ``int8_scaled_mm_with_quant``).
- vLLM 0.33 has no sparse kernels and raises on a non-empty
  ``sparsity_config``. ``finalize_checkpoint`` never leaves one in
  ``config.json``; the sparsity record lives in ``tamp_report.json`` instead.
- Nothing says whether the pattern survived quantization. ``saved_weights``
  reads the weights back from the safetensors files (dequantized with
  compressed-tensors' own compressors), so the pattern is counted in what was
  actually written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from loguru import logger

__all__ = [
    "checkpoint_names",
    "finalize_checkpoint",
    "ignore_both_namings",
    "rename_saved_weights",
    "saved_weights",
    "strip_sparsity_config",
    "write_text_atomically",
]

CONFIG_FILE_NAME = "config.json"
INDEX_FILE_NAME = "model.safetensors.index.json"


def _reverted_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each module name -> the name ``save_pretrained`` writes its weights under."""
    from transformers.core_model_loading import revert_weight_conversion

    # One call for all names: each gets its own placeholder tensor, so the renamed
    # keys map back to their names by the tensors' identity.
    placeholders = {f"{name}.weight": torch.empty(0) for name in names}
    owner = {id(t): key.removesuffix(".weight") for key, t in placeholders.items()}
    renamed = revert_weight_conversion(model, placeholders)
    out = {name: name for name in names}  # a converter that merges weights leaves no one-to-one name
    out.update({owner[id(t)]: key.removesuffix(".weight") for key, t in renamed.items() if id(t) in owner})
    return out


def _prefixes_removed_on_load(model: torch.nn.Module) -> dict[str, str]:
    """Module name of each sub-model that transformers loads by removing a prefix
    from its weights' names (CLIP's and SigLIP's ``vision_model``) -> that prefix."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import PrefixChange

    out = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, PreTrainedModel):
            continue
        for conversion in extract_weight_conversions_for_model(module) or []:
            if isinstance(conversion, PrefixChange) and conversion.prefix_to_remove and not conversion.model_prefix:
                out[name] = conversion.prefix_to_remove
    return out


def _prefix_renames(model: torch.nn.Module) -> dict[str, str]:
    """Saved name of each sub-model whose prefix ``save_pretrained`` drops -> that
    name with the prefix put back (``vision_tower`` -> ``vision_tower.vision_model``).

    A sub-model loaded from files that had the prefix is saved with it, and is
    left out. Found from one of its weights: the saved name of
    ``<sub-model>.<inside>`` ends with ``.<inside>``; what comes before is where
    the sub-model's weights are saved.
    """
    out = {}
    for submodel, prefix in _prefixes_removed_on_load(model).items():
        first = next((n for n, _ in model.get_submodule(submodel).named_parameters()), None)
        if first is None:
            continue
        inside = first.rpartition(".")[0] or first
        saved = _reverted_names(model, [f"{submodel}.{inside}"])[f"{submodel}.{inside}"]
        root = saved.removesuffix(f".{inside}")
        if root != saved and root != prefix and not root.endswith(f".{prefix}"):
            out[root] = f"{root}.{prefix}"
    return out


def _put_back(name: str, renames: dict[str, str]) -> str:
    for root, fixed in renames.items():
        if name.startswith(root + "."):
            return fixed + name[len(root):]
    return name


def checkpoint_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each module name of ``model`` -> the name its weights have in a finalized checkpoint.

    transformers 5 renames some prefixes on load (LLaVA's ``language_model.model``
    becomes ``model.language_model``) and reverses that on save; this applies the
    same reversal ``save_pretrained`` does, to module names, then puts back the
    prefixes it drops (``vision_model``, see the module docstring), as
    ``finalize_checkpoint`` does in the files.
    """
    renames = _prefix_renames(model)
    return {name: _put_back(saved, renames) for name, saved in _reverted_names(model, names).items()}


def _weighted_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


# vLLM's fused layers (its models' ``packed_modules_mapping``) and the layers each is made of.
VLLM_FUSED_LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _with_fused_names(names: list[str]) -> list[str]:
    """``names`` with each vLLM fused layer all of whose shards are in it, right after the last of
    its shards' entries."""
    present = set(names)
    last = {}  # fused layer -> index of its last shard entry
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        for fused, shards in VLLM_FUSED_LAYERS.items():
            if not name.startswith("re:") and leaf in shards and f"{parent}.{fused}" not in present \
                    and all(f"{parent}.{shard}" in present for shard in shards):
                last[f"{parent}.{fused}"] = i
    after = {}
    for fused, i in last.items():
        after.setdefault(i, []).append(fused)
    return [n for i, name in enumerate(names) for n in (name, *after.get(i, []))]


def ignore_both_namings(ignore: list[str], model: torch.nn.Module) -> list[str]:
    """``ignore`` with every module entry also under its other naming.

    Entries may be in transformers naming or checkpoint naming; ``re:`` patterns
    are kept as they are. An entry in the naming ``save_pretrained`` gave before
    the prefix rename (compressed-tensors writes that one) is replaced by the
    finalized name, which is the one the files have. Order is kept, each added
    name right after its entry, so a diff of ``config.json`` reads naturally;
    then vLLM's fused name (``...qkv_proj``) after the last of its shards, where
    every shard is ignored (see the module docstring).
    """
    modules = _weighted_modules(model)
    to_checkpoint = checkpoint_names(model, modules)
    to_model = {v: k for k, v in to_checkpoint.items()}
    renamed = {v: k for k, v in _reverted_names(model, modules).items() if v != to_checkpoint[k]}
    out: list[str] = []
    for entry in ignore:
        if entry in renamed:  # a name no longer in the files: the module's two names instead
            names = (renamed[entry], to_checkpoint[renamed[entry]])
        else:
            names = (entry, to_model.get(entry), to_checkpoint.get(entry))
        for name in names:
            if name is not None and name not in out:
                out.append(name)
    return _with_fused_names(out)


def strip_sparsity_config(config: dict) -> dict | None:
    """Remove a non-empty ``sparsity_config`` from a ``config.json`` dict; return it.

    vLLM 0.33 raises on any non-empty ``sparsity_config``. An empty one is left
    as llm-compressor wrote it.
    """
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    sparsity = quantization.get("sparsity_config")
    if not sparsity:
        return None
    quantization["sparsity_config"] = {}
    return sparsity


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}: is this a saved checkpoint?")
    return files


def saved_weights(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    names: list[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, weight)`` for modules ``names`` (model naming) as saved in ``directory``.

    One module at a time, so measuring a large checkpoint holds one weight in
    memory. Quantized modules are dequantized with compressed-tensors' own
    compressor for the format they were saved in (the scheme is read from the
    in-memory module), so a weight that was pruned reads back exactly 0.
    """
    from compressed_tensors.compressors import BaseCompressor
    from safetensors import safe_open

    directory = Path(directory)
    saved_as = checkpoint_names(model, names)
    wanted = {saved_as[n]: n for n in names}
    where: dict[str, dict[str, tuple]] = {n: {} for n in names}  # name -> local -> (file, key)
    with contextlib.ExitStack() as stack:
        for path in _safetensors_files(directory):
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            for key in f.keys():
                prefix, _, local = key.rpartition(".")
                if prefix in wanted:
                    where[wanted[prefix]][local] = (f, key)
        for name in names:
            if not where[name]:
                raise KeyError(f"{name} (saved as {saved_as[name]}) is not in the checkpoint at {directory}")
            state = {local: f.get_tensor(key) for local, (f, key) in where[name].items()}
            if "weight" in state and "weight_scale" not in state:
                yield name, state["weight"]
                continue
            scheme = getattr(model.get_submodule(name), "quantization_scheme", None)
            if scheme is None or scheme.format is None:
                raise ValueError(f"{name} was saved quantized but its scheme or format is unknown")
            compressor = BaseCompressor.get_value_from_registry(str(scheme.format.value))
            yield name, compressor.decompress(state, scheme)["weight"]


@contextlib.contextmanager
def _replaced_atomically(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` to write; it replaces ``path`` in one step
    when the block ends, and is removed if the block raises.

    mkstemp creates its file with mode 0600; the checkpoint's other files get
    0666 less the umask (usually 0644), and a server running as another user
    must be able to read these too.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` in one step, readable like save_pretrained's files."""
    with _replaced_atomically(Path(path)) as tmp:
        Path(tmp).write_text(text)


def _write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def rename_saved_weights(model: torch.nn.Module, directory: str | os.PathLike) -> dict[str, str]:
    """Put back in the saved files the prefixes transformers dropped (see the module docstring).

    One shard at a time (each replaced in one step), then the shard index.
    Returns the tensor renames made; an empty dict when every name was right.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = _prefix_renames(model)
    if not prefixes:  # nothing dropped: no file is opened
        return {}
    directory = Path(directory)
    renames: dict[str, str] = {}
    for path in sorted(directory.glob("*.safetensors")):  # none: a config-only folder, nothing to rename
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            here = {key: new for key in keys if (new := _put_back(key, prefixes)) != key}
            if not here:
                continue
            metadata = f.metadata()
            tensors = {here.get(key, key): f.get_tensor(key) for key in keys}
        with _replaced_atomically(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        renames.update(here)
    index = directory / INDEX_FILE_NAME
    if renames and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renames.get(k, k): v for k, v in data["weight_map"].items()}
        _write_json_atomically(index, data)
    return renames


def finalize_checkpoint(model: torch.nn.Module, directory: str | os.PathLike) -> dict:
    """Make the checkpoint in ``directory`` loadable by both transformers 5 and vLLM.

    Renames weights to the hub's (and vLLM's) naming (``rename_saved_weights``);
    then, for a quantized checkpoint, writes the quantization ``ignore`` list
    under both namings and drops a non-empty ``sparsity_config``. Returns what it
    changed: ``{"weights_renamed": int, "ignore_added": [...],
    "sparsity_config_removed": dict | None}``.
    """
    renamed = len(rename_saved_weights(model, directory))
    path = Path(directory) / CONFIG_FILE_NAME
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return {"weights_renamed": renamed, "ignore_added": [], "sparsity_config_removed": None}
    before = list(quantization.get("ignore") or [])
    after = ignore_both_namings(before, model)
    quantization["ignore"] = after
    removed = strip_sparsity_config(config)
    added = [n for n in after if n not in before]
    if after != before or removed:
        _write_json_atomically(path, config)
    if removed:
        logger.warning(
            f"removed a non-empty sparsity_config from {path} (vLLM 0.33 refuses one); "
            "the sparsity record is in tamp_report.json"
        )
    return {"weights_renamed": renamed, "ignore_added": added, "sparsity_config_removed": removed}
