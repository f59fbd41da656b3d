"""A tiny random LLaVA with a real processor, to try the own-model path offline.

    python examples/tiny_model.py my-model --sample-images my-images

writes ``my-model/`` (weights, config, tokenizer, image processor, chat template:
what a hub LLaVA folder holds) and, with ``--sample-images``, a folder of small
generated pictures, each with a one-line caption beside it. The model is random:
it is for trying the commands, not for judging quality (the demo model is that).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from tamp_modifier.testing.synthetic import build_tiny_model, build_tiny_processor

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="model folder to write")
    parser.add_argument("--sample-images", metavar="DIR", help="also write 8 captioned pictures here")
    args = parser.parse_args()
    model = build_tiny_model("llava", hidden_size=128, intermediate_size=256, num_layers=2)
    model.save_pretrained(args.output)
    build_tiny_processor(model).save_pretrained(args.output)
    print(f"saved a tiny random LLaVA with its processor to {args.output}")
    if args.sample_images:
        folder = Path(args.sample_images)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            name, rgb = list(COLOURS.items())[i % len(COLOURS)]
            pixels = np.full((48, 48, 3), 245, dtype=np.uint8)
            y, x = rng.integers(0, 32, size=2)
            pixels[y : y + 16, x : x + 16] = rgb
            Image.fromarray(pixels).save(folder / f"picture{i}.png")
            (folder / f"picture{i}.txt").write_text(f"a {name} square\n")
        print(f"wrote 8 captioned pictures to {folder}")
