"""Presets of the benchmark, full size and ``--quick`` size: parameter sets of the step presets (fp32), models of the
training presets and of the ``fsdp2`` preset, tensor counts of the scaling preset.

Invariant: a ``--quick`` preset keeps the structure of its full one (the same kinds of tensors and param groups) at a
size a 2-core CPU runs in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from optcapture.bench.gpt import GPTConfig

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


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class TrainingPreset:
    """A nanoGPT-style training run: the model, the batch, and nanoGPT's AdamW hyperparameters."""

    model: GPTConfig
    batch: int
    lr: float = 6e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_iterations: int = 10
    """LambdaLR's linear warmup: the lr changes at every one of the first iterations (compiles and early blocks)."""
    clip: float = 1.0


TRAINING: dict[str, TrainingPreset] = {
    # nanoGPT's shakespeare-char model (6 x 384, 256 positions, 65 tokens), its head untied: 77 tensors.
    "train-tiny": TrainingPreset(GPTConfig(layers=6, heads=6, width=384, vocab=65, sequence=256, tied_head=False),
                                 batch=16),
    # GPT-2 124M: 148 tensors, head tied to the token embedding.
    "train-gpt2": TrainingPreset(GPTConfig(layers=12, heads=12, width=768, vocab=50257, sequence=1024), batch=8),
}
TRAINING_QUICK: dict[str, TrainingPreset] = {
    "train-tiny": TrainingPreset(GPTConfig(layers=2, heads=2, width=64, vocab=65, sequence=32, tied_head=False),
                                 batch=4),
    "train-gpt2": TrainingPreset(GPTConfig(layers=2, heads=2, width=96, vocab=512, sequence=64), batch=2),
}


def training_for(preset: str, quick: bool) -> TrainingPreset:
    return (TRAINING_QUICK if quick else TRAINING)[preset]


@dataclasses.dataclass(frozen=True)
class ScalingPreset:
    counts: tuple[int, ...]
    compile_limit: int
    """Stock torch.compile runs at up to this many tensors unless ``--methods`` names it: its first call grows with
    the count (78 s at 300 tensors on an H100 host, baseline-h100.md; 116 s at 77 on a busy 2-core CPU)."""


SCALING = ScalingPreset(counts=(77, 300, 1000, 3000), compile_limit=300)
SCALING_QUICK = ScalingPreset(counts=(8, 32), compile_limit=8)
SCALING_NUMEL = {"cuda": 4096, "cpu": 64}
"""Floats per tensor: the step is host-bound at either size."""


@dataclasses.dataclass(frozen=True)
class ShardedPreset:
    """The ``fsdp2`` preset: a model that ``fully_shard`` shards (each block, then the root) and the batches whose
    backward passes make its grads."""

    model: GPTConfig
    batch: int
    sequence: int
    """Tokens per row of a batch (at most ``model.sequence``)."""


FSDP2 = ShardedPreset(GPTConfig(layers=12, heads=12, width=768, vocab=50257, sequence=1024), batch=1, sequence=1024)
"""GPT-2 124M (148 tensors, head tied to the token embedding); every position of ``wpe`` gets a grad."""
FSDP2_QUICK = ShardedPreset(GPTConfig(layers=2, heads=2, width=64, vocab=512, sequence=64), batch=2, sequence=64)
"""The same structure (28 tensors) at a size a 2-core CPU steps in milliseconds: ``--quick``, and the CPU."""


def sharded_for(device_type: str, quick: bool) -> ShardedPreset:
    return FSDP2_QUICK if quick or device_type == "cpu" else FSDP2
