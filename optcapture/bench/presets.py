"""Parameter sets of the benchmark (fp32), full size and ``--quick`` size."""

from __future__ import annotations

import math
from collections.abc import Callable

Shapes = list[tuple[int, ...]]
ShapesFactory = Callable[[], Shapes]


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, positions: int = 1024) -> Shapes:
    """GPT-2 small: 148 tensors, 124.4M params at full size."""
    shapes: Shapes = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return [*shapes, (width,), (width,)]


def small_shapes(count: int = 300, numel: int = 4096) -> Shapes:
    """Many small tensors: launch-bound (300 x 4096 floats at full size)."""
    return [(numel,)] * count


def big_shapes(count: int = 96, rows: int = 4096, cols: int = 2304, tail: tuple[int, int] = (1800, 1024)) -> Shapes:
    """About 0.9B params in 97 tensors: bandwidth-bound."""
    shapes: Shapes = [(rows, cols)] * count
    return [*shapes, tail]


PRESETS: dict[str, ShapesFactory] = {"gpt2": gpt2_shapes, "small": small_shapes, "big": big_shapes}
QUICK: dict[str, ShapesFactory] = {
    "gpt2": lambda: gpt2_shapes(layers=2, width=64, vocab=512, positions=64),
    "small": lambda: small_shapes(count=30, numel=1024),
    "big": lambda: big_shapes(count=4, rows=256, cols=256, tail=(64, 64)),
}


def shapes_for(preset: str, quick: bool) -> Shapes:
    return (QUICK if quick else PRESETS)[preset]()


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)
