"""How uneven the inputs of the demo's language-model Linears are, channel by channel.

Wanda scores a weight by |W_ij| * ||X_j||: where every input channel j has about the same
norm, that is magnitude pruning within each row, and the two rank alike. Real LLMs have a few
input channels (activation outliers) with norms many times the median, which is why Wanda
beats magnitude on them. This prints, per projection and layer, max_j ||X_j|| / median_j
||X_j|| over calibration samples of the demo model:

    python benchmarks/activation_outliers.py [--model FOLDER] [--samples 128]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from tamp_modifier.demo.model import demo_calibration_set, load_demo_model


def channel_norm_spread(model, rows) -> dict[str, list[float]]:
    """Per projection name, ``max / median`` of its input channels' norms, one value per layer."""
    squares: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args, _output):
            x = args[0].detach().double().flatten(0, -2)
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)

        return hook

    language = model.model.language_model
    handles = [m.register_forward_hook(record(n)) for n, m in language.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for row in rows:
                model(**row)
    finally:
        for h in handles:
            h.remove()
    spread = defaultdict(list)
    for name, sq in squares.items():
        norms = sq.sqrt()
        spread[name.rsplit(".", 1)[-1]].append(round((norms.max() / norms.median()).item(), 2))
    return dict(spread)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a demo model folder; default: the shipped one")
    p.add_argument("--samples", type=int, default=128)
    args = p.parse_args(argv)
    model, tokenizer = load_demo_model(args.model)
    rows = demo_calibration_set(tokenizer, args.samples)
    spread = channel_norm_spread(model, rows)
    print("| projection | max / median input-channel norm, layer 0 to last |\n|---|---|")
    for name, values in spread.items():
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} |")
    print(json.dumps(spread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
