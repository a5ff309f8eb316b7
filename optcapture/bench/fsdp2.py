"""The ``fsdp2`` preset: AdamW's step over a GPT-2-sized model that FSDP2 shards (``fully_shard`` on every block,
then the root), on one rank or under ``torchrun``; each rank steps its local shards.

Methods: eager AdamW ``foreach=True`` (FSDP2's default on CUDA: ``torch.distributed.tensor`` adds DTensor to the
optimizers' foreach-supported types), ``fused=True``, stock ``torch.compile`` (tensor lr, PyTorch's recipe) and
optcapture (``optcapture.capture(opt)``, the README's FSDP2 recipe). Each has its own sharded copy of one model
(same init) and new grads before every step, which FSDP2's own backward made (see :func:`_grads_from_backward`);
they are built, then timed in alternating blocks (:mod:`optcapture.bench.blocks`) and checked against eager's local
shards. Timings are rank 0's; the difference to eager is the largest over all ranks.

Invariant: every rank builds every method in the same order and runs the same collectives: the backward passes
that make each copy's grads, before anything of the method that could fail on one rank only (its step), and one
all-reduce of the differences over a vector with a place for every method named, so a method that fails on one
rank only never leaves another rank waiting in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

import optcapture
from optcapture import dtensors
from optcapture.bench import methods
from optcapture.bench.blocks import run_blocks, synchronize
from optcapture.bench.gpt import GPT
from optcapture.bench.measure import (
    StepContender,
    failed,
    final_params,
    note,
    release,
    say,
    step_result,
    warmed_contender,
)
from optcapture.bench.presets import ShardedPreset
from optcapture.bench.results import Result

GRAD_SETS = 2
"""Backward passes per copy: the grads a step gets alternate between their outputs (as the step presets' spare
grads do), so every step gets other grad tensors than the step before it."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the process group, and the device its rank steps on."""

    rank: int
    size: int
    device: torch.device


def _device_of_rank(device_type: str) -> torch.device:
    """CUDA: the GPU of this rank (torchrun's LOCAL_RANK, else 0), made current before NCCL starts on it."""
    if device_type != "cuda":
        return torch.device(device_type)
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[World]:
    """The default process group: the caller's if one is initialized; torchrun's (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` in the environment); else one rank of its own on a free localhost port. NCCL on
    CUDA, gloo on the CPU. A group made here is destroyed on exit."""
    device = _device_of_rank(device_type)
    made_here = not dist.is_initialized()
    if made_here:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            # Port 0: the OS picks a free port as the store binds it (no window in which another process takes it).
            store = dist.TCPStore("localhost", 0, world_size=1, is_master=True)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if made_here:
            dist.destroy_process_group()


def _sharded_copy(master: GPT, mesh: DeviceMesh) -> GPT:
    model = copy.deepcopy(master)  # one deepcopy: the head stays tied to the token embedding
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _grads_from_backward(model: GPT, params: list[torch.Tensor],
                         batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """The grads one backward pass gives ``params``, left off the params.

    Made by FSDP2's backward rather than assigned: FSDP2 gives each param a new DTensor grad that views the
    reduce-scatter output of its ``fully_shard`` unit (``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``,
    ``foreach_reduce``), one output per unit, so a unit's grads are consecutive views of one buffer. That layout
    decides how a captured step reads grads (in place through a table, or copied): DTensor grads made with
    ``distribute_tensor`` would each own their storage, which FSDP2 never gives. The backward passes run while the
    methods are built, outside the timed blocks, whose time is the step's alone (the training presets time whole
    iterations)."""
    for p in params:
        p.grad = None  # FSDP2 accumulates into an existing grad in place; None makes it assign a new one
    model(*batch).backward()
    grads = []
    for p in params:
        if p.grad is None:
            raise RuntimeError("a param of the model got no grad from its backward")
        grads.append(p.grad)
        p.grad = None
    return grads


def _batches(preset: ShardedPreset, device: torch.device, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random tokens and targets, other ones on each rank (as a data-parallel loader gives), seeded."""
    generator = torch.Generator(device="cpu").manual_seed(1000 + rank)
    shape = (preset.batch, preset.sequence)
    return [(torch.randint(0, preset.model.vocab, shape, generator=generator).to(device),
             torch.randint(0, preset.model.vocab, shape, generator=generator).to(device)) for _ in range(GRAD_SETS)]


def _build(method: str, model: GPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
           device: torch.device) -> StepContender | methods.Skipped:
    """``method`` over the sharded ``model``, its grads made and its first calls run."""
    params = list(model.parameters())
    grad_sets = [_grads_from_backward(model, params, batch) for batch in batches]
    optimizer = methods.make_optimizer("adamw", params, foreach=True)  # the step presets' AdamW, as FSDP2 runs it
    if method == "optcapture":
        # The README's FSDP2 recipe: its first calls trace FSDP2's grads, views of the reduce-scatter output, with
        # static shapes (``torch.compile(opt.step, backend="optcapture")`` traces them with symbolic ones).
        built: methods.Setup | methods.Skipped = methods.Setup(optcapture.capture(optimizer), optimizer.step)
    else:
        built = methods.setup(method, optimizer, device)
    if isinstance(built, methods.Skipped):
        return built
    built.fresh_grads = True  # as after zero_grad() and FSDP2's backward: new grad DTensors every step
    return warmed_contender(method, built, params, grad_sets, device)


def local_numel(params: Sequence[torch.Tensor]) -> int:
    """Elements of this rank's local shards of ``params``."""
    return sum(dtensors.local(p).numel() for p in params)


def compare_fsdp2(label: str, preset: ShardedPreset, method_names: Sequence[str], world: World, blocks: int,
                  steps: int, bandwidth: float, notes: list[str]) -> list[Result]:
    """Build every method (eager first: the reference) on every rank, time them in alternating blocks, check them.
    ``notes`` gets the model's line and one for each method skipped or failed."""
    device = world.device
    speak = world.rank == 0
    mesh = init_device_mesh(device.type, (world.size,))
    torch.manual_seed(0)
    master = GPT(preset.model).to(device)
    batches = _batches(preset, device, world.rank)
    names = ["eager", *(m for m in method_names if m != "eager")]
    contenders: list[StepContender] = []
    # Each copy lives while the methods step, as a training loop keeps its model: FSDP2's state of a module (found
    # through weak references: torch.distributed._composable_state) is what tells a capture where the padded
    # shard that the next all-gather reads lies.
    models: list[GPT] = []
    for name in names:
        try:
            models.append(_sharded_copy(master, mesh))
            built = _build(name, models[-1], batches, device)
        except Exception as error:  # reported with the others' results, as a benchmark of what happens must
            failed(notes, label, name, error)
            continue
        if isinstance(built, methods.Skipped):
            note(notes if speak else None, f"{label} {name} skipped: {built.reason}")
            continue
        if speak:
            say(f"  {label}: {name} built, first call {built.timings.first_call_s:.1f} s")
        contenders.append(built)
    numel = local_numel(contenders[0].params) if contenders else 0  # model.parameters(): a tied param once
    floor_ms = methods.BYTES_PER_PARAM["adamw"] * numel / bandwidth * 1e3
    total = sum(p.numel() for p in master.parameters())
    notes.append(f"{label}: GPT {preset.model.layers} x {preset.model.width} ({total / 1e6:.3g}M params, "
                 f"{preset.model.tensors} tensors) under fully_shard (each block, then the root) on {world.size} "
                 f"rank(s); rank 0's local shards: {numel / 1e6:.3g}M params (the floor's); timings are rank 0's, "
                 "matches eager the largest difference over ranks")
    del master
    run_blocks(contenders, [c.timings for c in contenders], device, blocks, steps)
    finals = [final_params(c, device) for c in contenders]
    reference = finals[0] if contenders and contenders[0].name == "eager" else None
    results = [step_result(label, c, final, reference, floor_ms) for c, final in zip(contenders, finals, strict=True)]
    largest_difference_over_ranks(results, names, device)
    tolerate_fused_drift(results)
    if speak:
        for r in results:
            say(f"  {label}: {r.method:12s} {r.step_ms:9.3f} ms/step, host {r.host_ms:.3f} ms")
    del contenders, finals, models
    release(device)
    return results


def largest_difference_over_ranks(results: list[Result], names: Sequence[str], device: torch.device) -> None:
    """Each result's ``max_abs_diff`` becomes the largest over ranks: one all-reduce of a vector with a place for
    every method named, so that ranks where different methods failed still agree on its size."""
    if dist.get_world_size() == 1:
        return
    synchronize(device)
    diffs = torch.full((len(names),), -1.0, dtype=torch.float64, device=device)
    for r in results:
        if r.max_abs_diff is not None:
            diffs[names.index(r.method)] = r.max_abs_diff
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    for r in results:
        if r.max_abs_diff is not None:
            r.max_abs_diff = float(diffs[names.index(r.method)])


FUSED_DRIFT_CAP = 1e-3
"""The most :func:`tolerate_fused_drift` allows: a fused run that drifts far must not hide a broken method."""


def tolerate_fused_drift(results: list[Result]) -> None:
    """Each result's tolerance becomes at least 3x ``fused=True``'s own difference to eager (at most
    :data:`FUSED_DRIFT_CAP`), as in the training presets. FSDP2's backward gives every position of GPT-2's embeddings
    a grad, most of them tiny, where Adam's ``m / sqrt(v)`` magnifies rounding: after the timed steps PyTorch's fused
    AdamW ends 2.5e-4 from its foreach AdamW (H100, torch 2.11), above the step presets' 1e-4, though both are
    right."""
    fused = next((r.max_abs_diff for r in results if r.method == "fused" and r.max_abs_diff is not None), None)
    if fused is None:
        return
    for r in results:
        r.tolerance = max(r.tolerance, min(3 * fused, FUSED_DRIFT_CAP))
