"""Check that a saved checkpoint reads correctly with compressed-tensors 0.17.0.

vLLM 0.33 pins compressed-tensors 0.17.0; llmcompressor 0.14 writes with 0.19.0.
This script imports nothing of tamp_modifier or llm-compressor, so it runs in a
separate environment with the version vLLM uses (``scripts/check_ct017.sh``
builds one):

    python scripts/check_quantization_config.py CHECKPOINT_DIR

It checks what vLLM reads: the ``quantization_config`` parses with 0.17's
strict models (an unknown field is an error there); every parsed value equals
the JSON; the format is one 0.17 knows; ``sparsity_config`` is empty (vLLM 0.33
raises otherwise); the ignore list covers every unquantized Linear and no
quantized one, in the checkpoint's naming (vLLM's); every quantized module has
the tensors 0.17's compressor expects and decompresses to finite weights; and,
when ``tamp_report.json`` is there, the zeros 0.17 reads equal the sparsity the
report measured with 0.19. Exit status 0 if all hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def _load_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {local tensor name: tensor}, from every safetensors file."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                prefix, _, local = key.rpartition(".")
                modules.setdefault(prefix, {})[local] = f.get_tensor(key)
    if not modules:
        raise SystemExit(f"no *.safetensors in {folder}")
    return modules


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


def _layer_key(name: str) -> str:
    """``layers.3.mlp.up_proj``: the part of a decoder Linear's name both namings share."""
    return name[name.index("layers."):] if "layers." in name else name


def _compare(parsed, raw: dict, where: str, problems: list[str]) -> None:
    """Every field of the JSON must survive parsing with the same value."""
    dumped = parsed.model_dump(mode="json")
    for key, value in raw.items():
        if key not in dumped:
            problems.append(f"{where}: field {key!r} is dropped by compressed-tensors 0.17")
        elif isinstance(value, dict) and isinstance(dumped[key], dict):
            continue
        elif dumped[key] != value and not (value is None and dumped[key] in (None, {}, [])):
            problems.append(f"{where}: {key} = {value!r} in the file, {dumped[key]!r} once parsed")


def check(folder: Path) -> list[str]:
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    problems: list[str] = []
    print(f"compressed-tensors {ct_version}, checkpoint {folder}")
    config = json.loads((folder / "config.json").read_text())
    raw = config.get("quantization_config")
    if raw is None:
        print("no quantization_config: a plain dense checkpoint, nothing to check")
        return problems
    if raw.get("sparsity_config"):
        problems.append(f"sparsity_config is not empty ({raw['sparsity_config']}): vLLM 0.33 raises on it")
    try:
        parsed = QuantizationConfig.model_validate(raw)
    except Exception as error:  # pydantic's ValidationError, reported as it is
        return problems + [f"quantization_config does not parse: {error}"]
    try:
        CompressionFormat(raw["format"])
    except ValueError:
        problems.append(f"format {raw.get('format')!r} is unknown to compressed-tensors {ct_version}")
    schemes = {}
    for group, body in raw.get("config_groups", {}).items():
        try:
            scheme = QuantizationScheme.model_validate(body)
        except Exception as error:
            problems.append(f"config group {group} does not parse: {error}")
            continue
        for part in ("weights", "input_activations", "output_activations"):
            if body.get(part) is not None:
                _compare(QuantizationArgs.model_validate(body[part]), body[part], f"{group}.{part}", problems)
        scheme.format = scheme.format or raw["format"]
        schemes[group] = scheme
    ignore = list(parsed.ignore or [])

    modules = _load_tensors(folder)
    quantized = {n: t for n, t in modules.items() if "weight_scale" in t}
    linears = {n for n, t in modules.items()
               if "weight" in t and t["weight"].dim() == 2 and n not in quantized}
    unquantized = {n for n in linears if "embed" not in n}
    for name in sorted(quantized):
        if any(_matches(name, p) for p in ignore):
            problems.append(f"{name} is quantized in the file but matched by the ignore list")
    for name in sorted(unquantized):
        if not any(_matches(name, p) for p in ignore):
            problems.append(f"{name} is not quantized in the file but no ignore entry matches it: "
                            "vLLM would look for its scales")

    report_path = folder / "tamp_report.json"
    measured = {}
    if report_path.is_file():
        pattern = json.loads(report_path.read_text()).get("checkpoint", {}).get("pattern", {})
        layers = pattern.get("layers", {})
        measured = {n: v["measured"] for n, v in layers.items()}
    checked = agreed = 0
    for name, tensors in sorted(quantized.items()):
        scheme = next(iter(schemes.values())) if len(schemes) == 1 else next(
            (s for s in schemes.values() if any(_matches(name, t) for t in s.targets)), None)
        if scheme is None:
            problems.append(f"{name}: no config group targets it by name; cannot pick its scheme")
            continue
        compressor = BaseCompressor.get_value_from_registry(CompressionFormat(scheme.format).value)
        missing = [p for p in compressor.compression_param_names(scheme) if p not in tensors]
        if missing:
            problems.append(f"{name}: tensors {missing} that compressed-tensors {ct_version} expects "
                            "are missing")
            continue
        weight = compressor.decompress(dict(tensors), scheme)["weight"]
        checked += 1
        if not torch.isfinite(weight.float()).all():
            problems.append(f"{name}: decompresses to non-finite weights")
        zeros = float((weight == 0).float().mean())
        saved_as = [n for n in measured if _layer_key(n) == _layer_key(name)]
        if len(saved_as) == 1:
            if abs(measured[saved_as[0]] - zeros) > 1e-9:
                problems.append(f"{name}: {zeros:.6f} zeros with {ct_version}, report says "
                                f"{measured[saved_as[0]]:.6f}")
            else:
                agreed += 1
    print(f"format {raw['format']}, {len(schemes)} config group(s), {len(ignore)} ignore entries")
    print(f"{checked} quantized modules decompressed, {len(unquantized)} unquantized Linears "
          "covered by ignore")
    if measured:
        print(f"sparsity read with {ct_version} equals tamp_report.json for {agreed} of "
              f"{len(measured)} layers")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a folder saved by oneshot(output_dir=...) or tamp-prune")
    args = parser.parse_args(argv)
    problems = check(args.checkpoint)
    for problem in problems:
        print("PROBLEM:", problem)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
