"""The demo task suite: seeded questions on small drawn images, and text-only ones.

Every image is 64 x 64 pixels, an 8 x 8 grid of 8-pixel cells that line up
with the vision tower's patches, so one patch sees one object (the patch
embedding then carries its colour and shape). Families, each its own accuracy:

    colour    "what colour is the object"   (one object) -> red
    shape     "what shape is the object"    (one object) -> square
    position  "left or right is the object" (one object) -> left
              "top or bottom is the object" (one object) -> bottom
    count     "how many objects are there"  (1 to 6)     -> three
    digit     "what digit is written" (a 15 x 21 digit) -> 7
    binding   "what colour is the circle"   (2 or 3 objects, shapes distinct) -> blue
              "what shape is the red object" (2 or 3 objects, colours distinct) -> cross
    text      "what is two plus three"                  -> five
              "what comes after four"                   -> five

Every answer is a single word, so a question is answered by the model's next
token. Colour, shape and position questions show a single object; binding
questions pick one object among several by one attribute and ask another, so
the language model must find that object's patch among the image tokens and
read it, as real VQA needs.

``make_split(split, n, seed)`` draws ``n`` questions per family; the ``eval``,
``calibration`` and ``train`` splits use disjoint seed streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "NUMBERS",
    "FAMILIES",
    "IMAGE_FAMILIES",
    "IMAGE_SIZE",
    "CELL",
    "Question",
    "Scene",
    "draw_scene",
    "draw_digit",
    "make_question",
    "make_split",
    "vocabulary",
]

IMAGE_SIZE = 64
CELL = 8  # pixels per cell = the vision tower's patch size
GRID = IMAGE_SIZE // CELL

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("square", "circle", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_OBJECTS = 6

FAMILIES = ("colour", "shape", "count", "position", "digit", "binding", "text")
BINDING_OBJECTS = (2, 3)  # fewest and most objects in a binding image
IMAGE_FAMILIES = FAMILIES[:-1]

# Split name -> offset of its seed stream, so splits never share a question stream.
_SPLITS = {"eval": 1_000_003, "calibration": 2_000_003, "train": 3_000_017}


def _shape_masks() -> dict[str, np.ndarray]:
    """6 x 6 boolean stamps, drawn inside a cell with a 1-pixel border."""
    y, x = np.mgrid[0:6, 0:6]
    centre = 2.5
    masks = {
        "square": np.ones((6, 6), bool),
        "circle": (y - centre) ** 2 + (x - centre) ** 2 <= 3.1**2 - 1.5,
        "triangle": np.abs(x - centre) <= (y + 0.5) / 2,  # apex up, base at the bottom row
        "cross": (np.abs(x - centre) < 1) | (np.abs(y - centre) < 1),
    }
    return masks


SHAPE_MASKS = _shape_masks()

# A 5 x 7 bitmap font for the digits (rows top to bottom, '#' = ink).
_FONT = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}
DIGITS = tuple(_FONT)
_DIGIT_SCALE = 3  # 15 x 21 pixels: spans a 2 x 3 block of cells


@dataclass(frozen=True)
class Scene:
    """Objects on the grid: ``(row, col, colour, shape)`` each, one per cell."""

    objects: tuple[tuple[int, int, str, str], ...]


@dataclass(frozen=True)
class Question:
    """One question. ``image`` is ``[64, 64, 3]`` uint8, or None for text-only."""

    family: str
    prompt: str
    answer: str
    image: np.ndarray | None = None

    def __eq__(self, other) -> bool:  # arrays do not compare with ==
        return (
            isinstance(other, Question)
            and (self.family, self.prompt, self.answer) == (other.family, other.prompt, other.answer)
            and ((self.image is None and other.image is None)
                 or (self.image is not None and other.image is not None
                     and np.array_equal(self.image, other.image)))
        )


def draw_scene(scene: Scene) -> np.ndarray:
    """The scene as a ``[64, 64, 3]`` uint8 image on a black background."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for row, col, colour, shape in scene.objects:
        y, x = row * CELL + 1, col * CELL + 1
        image[y : y + 6, x : x + 6][SHAPE_MASKS[shape]] = COLOURS[colour]
    return image


def draw_digit(digit: str, row: int, col: int, colour: str = "yellow") -> np.ndarray:
    """A ``[64, 64, 3]`` image with ``digit`` drawn from cell ``(row, col)``
    over a 2 x 3 block of cells (15 x 21 pixels)."""
    bitmap = np.array([[c == "#" for c in line] for line in _FONT[digit]])
    ink = np.kron(bitmap, np.ones((_DIGIT_SCALE, _DIGIT_SCALE), bool))
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    y, x = row * CELL + 1, col * CELL + 1
    image[y : y + ink.shape[0], x : x + ink.shape[1]][ink] = COLOURS[colour]
    return image


def _random_scene(rng: np.random.Generator, count: int) -> Scene:
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    colours, shapes = list(COLOURS), list(SHAPES)
    return Scene(tuple(
        (int(c) // GRID, int(c) % GRID, colours[rng.integers(4)], shapes[rng.integers(4)]) for c in cells
    ))


def _binding_question(rng: np.random.Generator) -> Question:
    count = int(rng.integers(BINDING_OBJECTS[0], BINDING_OBJECTS[1] + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    # The attribute that names the object is distinct across objects; the other is free.
    by_shape = bool(rng.integers(2))
    named = rng.permutation(len(SHAPES if by_shape else COLOURS))[:count]
    free = rng.integers(len(COLOURS if by_shape else SHAPES), size=count)
    colours, shapes = list(COLOURS), list(SHAPES)
    objects = tuple(
        (int(c) // GRID, int(c) % GRID, colours[f if by_shape else n], shapes[n if by_shape else f])
        for c, n, f in zip(cells, named.tolist(), free.tolist())
    )
    _, _, colour, shape = objects[int(rng.integers(count))]
    image = draw_scene(Scene(objects))
    if by_shape:
        return Question("binding", f"what colour is the {shape}", colour, image)
    return Question("binding", f"what shape is the {colour} object", shape, image)


def _scene_question(family: str, rng: np.random.Generator) -> Question:
    scene = _random_scene(rng, int(rng.integers(1, MAX_OBJECTS + 1)) if family == "count" else 1)
    image = draw_scene(scene)
    if family == "count":
        return Question(family, "how many objects are there", NUMBERS[len(scene.objects)], image)
    ((row, col, colour, shape),) = scene.objects
    if family == "colour":
        return Question(family, "what colour is the object", colour, image)
    if family == "shape":
        return Question(family, "what shape is the object", shape, image)
    half = GRID // 2
    if rng.integers(2):
        return Question(family, "left or right is the object", "left" if col < half else "right", image)
    return Question(family, "top or bottom is the object", "top" if row < half else "bottom", image)


def _digit_question(rng: np.random.Generator) -> Question:
    digit = DIGITS[rng.integers(10)]
    row, col = int(rng.integers(GRID - 2)), int(rng.integers(GRID - 1))  # the 2 x 3 block fits
    colour = list(COLOURS)[rng.integers(4)]
    return Question("digit", "what digit is written", digit, draw_digit(digit, row, col, colour))


def _text_question(rng: np.random.Generator) -> Question:
    kind = rng.integers(3)
    if kind == 0:
        a = int(rng.integers(10))
        return Question("text", f"what comes after {NUMBERS[a]}", NUMBERS[a + 1])
    if kind == 1:
        a = int(rng.integers(1, 11))
        return Question("text", f"what comes before {NUMBERS[a]}", NUMBERS[a - 1])
    a = int(rng.integers(11))
    b = int(rng.integers(11 - a))
    return Question("text", f"what is {NUMBERS[a]} plus {NUMBERS[b]}", NUMBERS[a + b])


def make_question(family: str, rng: np.random.Generator) -> Question:
    """One question of ``family`` drawn with ``rng``."""
    if family == "digit":
        return _digit_question(rng)
    if family == "text":
        return _text_question(rng)
    if family == "binding":
        return _binding_question(rng)
    if family in IMAGE_FAMILIES:
        return _scene_question(family, rng)
    raise ValueError(f"unknown task family {family!r}; families are {', '.join(FAMILIES)}")


def make_split(split: str, per_family: int, seed: int = 0, families=FAMILIES) -> list[Question]:
    """``per_family`` questions of each family, interleaved family by family.

    ``split`` is ``eval``, ``calibration`` or ``train``: each has its own seed
    stream. Questions still coincide across splits where the space is small:
    text questions come from 86 facts, single-object images from 1,024.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    rngs = {f: np.random.default_rng([seed, _SPLITS[split], FAMILIES.index(f)]) for f in families}
    return [make_question(f, rngs[f]) for _ in range(per_family) for f in families]


def vocabulary() -> list[str]:
    """Every word a prompt or answer can use, in a fixed order."""
    words = [
        "what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "are", "there",
        "left", "or", "right", "top", "bottom", "digit", "written", "comes", "after", "before", "plus",
    ]
    return [*words, *COLOURS, *SHAPES, *NUMBERS, *DIGITS]
