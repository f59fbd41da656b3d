"""Make a saved checkpoint deployable, and measure the sparsity its tensors hold.

Three things go wrong with a pruned (and quantized) vision-language checkpoint
saved by llm-compressor 0.14 and compressed-tensors 0.19:

- compressed-tensors writes the quantization ``ignore`` list in checkpoint
  naming (``vision_tower.encoder...``, ``language_model.lm_head``) when the
  model was loaded with ``from_pretrained``. vLLM reads that naming, but
  transformers 5 matches the list against its own module names
  (``model.vision_tower...``, ``lm_head``), quantizes the ignored modules on
  reload with no scales, and the logits are NaN. ``ignore_both_namings`` lists
  every entry under both names.
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
    "saved_weights",
    "strip_sparsity_config",
]

CONFIG_FILE_NAME = "config.json"


def checkpoint_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each module name of ``model`` -> the name its weights are saved under.

    transformers 5 renames some prefixes on load (LLaVA's ``language_model.model``
    becomes ``model.language_model``) and reverses that on save; this applies the
    same reversal ``save_pretrained`` does, to module names.
    """
    from transformers.core_model_loading import revert_weight_conversion

    # One call for all names: each gets its own placeholder tensor, so the renamed
    # keys map back to their names by the tensors' identity.
    placeholders = {f"{name}.weight": torch.empty(0) for name in names}
    owner = {id(t): key.removesuffix(".weight") for key, t in placeholders.items()}
    renamed = revert_weight_conversion(model, placeholders)
    out = {name: name for name in names}  # a converter that merges weights leaves no one-to-one name
    out.update({owner[id(t)]: key.removesuffix(".weight") for key, t in renamed.items() if id(t) in owner})
    return out


def _weighted_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


def ignore_both_namings(ignore: list[str], model: torch.nn.Module) -> list[str]:
    """``ignore`` with every module entry also under its other naming.

    Entries may be in transformers naming or checkpoint naming; ``re:`` patterns
    are kept as they are. Order is kept, each added name right after its entry,
    so a diff of ``config.json`` reads naturally.
    """
    to_checkpoint = checkpoint_names(model, _weighted_modules(model))
    to_model = {v: k for k, v in to_checkpoint.items()}
    out: list[str] = []
    for entry in ignore:
        for name in (entry, to_model.get(entry), to_checkpoint.get(entry)):
            if name is not None and name not in out:
                out.append(name)
    return out


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


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` in one step, readable like save_pretrained's files.

    mkstemp creates its file with mode 0600; the checkpoint's other files get
    0666 less the umask (usually 0644), and a server running as another user
    must be able to read these too.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def finalize_checkpoint(model: torch.nn.Module, directory: str | os.PathLike) -> dict:
    """Make ``config.json`` in ``directory`` loadable by both transformers 5 and vLLM 0.33.

    Writes the quantization ``ignore`` list under both namings and drops a
    non-empty ``sparsity_config``. Returns what it changed:
    ``{"ignore_added": [...], "sparsity_config_removed": dict | None}``.
    A checkpoint with no ``quantization_config`` is left untouched.
    """
    path = Path(directory) / CONFIG_FILE_NAME
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return {"ignore_added": [], "sparsity_config_removed": None}
    before = list(quantization.get("ignore") or [])
    after = ignore_both_namings(before, model)
    quantization["ignore"] = after
    removed = strip_sparsity_config(config)
    added = [n for n in after if n not in before]
    if added or removed:
        _write_json_atomically(path, config)
    if removed:
        logger.warning(
            f"removed a non-empty sparsity_config from {path} (vLLM 0.33 refuses one); "
            "the sparsity record is in tamp_report.json"
        )
    return {"ignore_added": added, "sparsity_config_removed": removed}
