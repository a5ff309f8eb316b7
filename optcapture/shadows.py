"""Stage 3, elementwise: the shadow step, the one program per run that replaces the per-tensor step.

A *shadow* optimizer of the user's class gets one param per *run*: a contiguous range of a flat
group whose members have a grad in this graph and equal scalar state (step counts ...). Its
params, grads and state are views of the flat storage that :mod:`optcapture.preparation` owns,
so running the optimizer's own ``step`` on the shadow updates every member at once.
Hyperparameters that only flow into tensor arithmetic become 0-dim device tensors (found by
:mod:`optcapture.hyper_probe`), so a scheduler changing them never changes the program. :func:`build` is
the stage: it builds the shadow, proves it and probes its hyperparameters.

Invariant: a shadow is built only for a :class:`~optcapture.discovery.StepGraph` whose lanes are
proven elementwise, and it is only used once :func:`prove_equivalent` has shown that the shadow's
per-run program is event for event the program every member runs in the real graph.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import types
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch

from optcapture import _compat, discovery, hyper_probe, input_roles
from optcapture.discovery import BucketKey, StepGraph
from optcapture.errors import CaptureError
from optcapture.hyper_probe import HyperKey, TracedGraph
from optcapture.input_roles import global_state
from optcapture.preparation import NON_HYPER_KEYS, PARAM, FlatGroup, PreparedOptimizer

log = logging.getLogger(__name__)

_shadow_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Run:
    """Members ``positions`` (consecutive in ``key``'s flat group) stepped as one tensor."""

    key: BucketKey
    positions: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass
class ShadowStep:
    """A callable that steps every run of a capture, and what it is made of."""

    call: Callable[[], None]
    shadow: torch.optim.Optimizer
    runs: list[Run]
    tensor_hypers: set[HyperKey]
    run_scalars: list[tuple[torch.Tensor, int, torch.Tensor]]
    """(member vector, first member, the run's own scalar): the scalar state the shadow steps."""
    groups: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """The shadow's param groups by the real group index (their float values can be refreshed)."""
    mirrored: list[tuple[dict[str, Any], int, frozenset[str]]] = dataclasses.field(default_factory=list)
    """(shadow group, real group index, keys the shadow holds its own way): every other key of the real group is
    written into the shadow's before each step, so Python numbers the step keeps in its groups (``group["step"]
    += 1``) are the real optimizer's, never the shadow's own count."""

    @property
    def aliased(self) -> bool:
        """True when two runs are views of one flat buffer (the compiled graph then has aliased inputs)."""
        return len({run.key for run in self.runs}) != len(self.runs)


def plan_runs(step: StepGraph, flats: dict[BucketKey, FlatGroup]) -> list[Run]:
    """Split each bucket into runs of consecutive members with equal scalar state.

    Reads the scalar-state vectors on the host once: this is compile time, not a step.
    """
    runs = []
    for bucket in step.buckets:
        flat = flats[bucket.key]
        position_of = {index: j for j, index in enumerate(flat.param_indices)}
        positions = sorted(position_of[i] for i in bucket.members)
        values = list(zip(*(vector.tolist() for vector in flat.scalars.values()), strict=True)) or \
            [()] * len(flat.params)
        current: list[int] = []
        for j in positions:
            if current and (j != current[-1] + 1 or values[j] != values[current[-1]]):
                runs.append(_make_run(flat, current))
                current = []
            current.append(j)
        if current:
            runs.append(_make_run(flat, current))
    return runs


def _make_run(flat: FlatGroup, positions: list[int]) -> Run:
    return Run(flat.key, tuple(positions), flat.slot(positions[0]).start, flat.slot(positions[-1]).stop)


def hyper_candidates(optimizer: torch.optim.Optimizer, groups: Iterable[int]) -> set[HyperKey]:
    """Float (or tuple-of-float) keys of ``groups`` (those that own runs): what could become a device tensor."""
    keys = set()
    for g in set(groups):
        for key, value in optimizer.param_groups[g].items():
            if key in NON_HYPER_KEYS:
                continue
            items = value if isinstance(value, tuple) else (value,)
            if items and all(type(v) is float for v in items):
                keys.add((g, key))
    return keys


def unwrapped_step(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    # The profiling hook, _use_grad_for_differentiable and torch.no_grad wrappers all set __wrapped__;
    # the shadow is stepped under no_grad by us, with no hooks (they already ran for the real step).
    fn: Any = type(optimizer).step
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn  # type: ignore[no-any-return]


def is_stock(optimizer: torch.optim.Optimizer) -> bool:
    """A ``torch.optim`` class (whose foreach and single-tensor forms PyTorch's own tests prove equal)."""
    return type(optimizer).__module__.startswith("torch.optim.")


def groups_stepped_eagerly_at_zero_lr(optimizer: torch.optim.Optimizer, runs: Iterable[Run]) -> tuple[int, ...]:
    """The param groups of ``runs`` whose steps at ``lr == 0.0`` the capture must leave to the optimizer's own
    eager step. The shadow of ``torch.optim.Adam``/``AdamW`` runs their capturable form, which divides by
    ``-lr / bias_correction1`` (torch/optim/adam.py, ``_single_tensor_adam``): at lr 0.0 that is ``0 / 0`` wherever
    the second moment is still 0 (a grad that was always 0: an embedding row no token used), and NaN is written into
    the param, where eager leaves it unchanged (pytorch#126514; stock ``torch.compile`` does the same). A warmup from
    lr 0.0 (``get_linear_schedule_with_warmup``) starts there. The other ``torch.optim`` classes stay finite.

    A group the user made ``capturable=True`` (the optimizer's default) is left out: its eager step runs the same
    form (and refuses CPU tensors), so the capture is what eager does. A group whose ``capturable`` Dynamo set is
    kept: tracing the first step of an optimizer whose params are all on a GPU sets ``capturable=True`` in the
    optimizer's own param groups (torch/_dynamo/variables/optimizer.py, ``_set_capturable``), which the user's eager
    step never had; the eager step then runs with it unset (:func:`optcapture.replay.step.eager_form`)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return ()
    groups = optimizer.param_groups
    built_capturable = bool(optimizer.defaults.get("capturable", False))
    return tuple(sorted({run.key.group for run in runs
                         if not (built_capturable and groups[run.key.group].get("capturable", False))}))


def _static(tensor: torch.Tensor) -> torch.Tensor:
    _compat.mark_static(tensor)
    return tensor


def build_shadow(optimizer: torch.optim.Optimizer, prepared: PreparedOptimizer, runs: list[Run],
                 flats: dict[BucketKey, FlatGroup], tensor_hypers: set[HyperKey],
                 execution: bool = True, run_grads: Sequence[torch.Tensor] | None = None,
                 values: Mapping[HyperKey, Any] | None = None, rebound: Sequence[str] = ()) -> ShadowStep:
    """A shadow of ``optimizer`` whose params are the runs, and a function that steps it.

    ``execution=False`` builds the shadow that is proven against the real graph: the user's own
    implementation, nothing added. ``execution=True`` builds the one that runs: it also copies each
    run's scalar state to every member's slot, and a stock ``torch.optim`` class runs its single-tensor
    implementation. A bucket is one tensor, so foreach gains nothing, and its foreach form turns tensor
    hyperparameters back into numbers inside AOT (seen on torch 2.11), which CUDA graphs cannot replay;
    PyTorch's test suite checks that the two implementations of each stock optimizer agree.

    ``run_grads``: each run's grad (a :class:`~optcapture.grad_tables.GradTable`'s virtual tensor); by
    default, the run's slice of the flat grad storage. ``values``: param-group entries the shadow holds instead of
    the live ones (the proof's shadow holds the values the real graph was traced with). ``rebound``: the state keys
    the step assigns new tensors to, sorted; after the step each is copied into the run's own tensor and the entry
    restored, as the real graph stores them (:mod:`optcapture.state_rebinds`).
    """
    stock = is_stock(optimizer)
    cls: Any = type(optimizer)
    shadow = cls.__new__(cls)
    shadow.__dict__.update(optimizer.__dict__)
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        setattr(shadow, name, collections.OrderedDict())
    shadow.state = collections.defaultdict(dict)
    # Tensors the step keeps under keys that are no param (MADGRAD's ``state["k"]``) are the real optimizer's own:
    # the shadow's one step per real step reads and updates them as the real step would.
    shadow.state.update(global_state(optimizer))
    groups: dict[int, dict[str, Any]] = {}
    mirrored: list[tuple[dict[str, Any], int, frozenset[str]]] = []
    broadcasts: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
    run_scalars: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    restores: list[tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]] = []
    for index, run in enumerate(runs):
        flat = flats[run.key]
        g = run.key.group
        if g not in groups:
            live = optimizer.param_groups[g]
            group = dict(live)
            group.update({key: value for (at, key), value in (values or {}).items() if at == g})
            group["params"] = []
            for key, value in live.items():
                if (g, key) in tensor_hypers:
                    if isinstance(value, tuple):
                        group[key] = tuple(prepared.hyper(g, key, i, run.key.device, v) for i, v in enumerate(value))
                    else:
                        group[key] = prepared.hyper(g, key, None, run.key.device, value)
            if "capturable" in group:
                group["capturable"] = True
            if execution and stock and "foreach" in group:
                group["foreach"] = False
            if "differentiable" in group:
                group["differentiable"] = False
            groups[g] = group
            mirrored.append((group, g, frozenset(key for key in group if group[key] is not live[key])))
        # Every tensor the shadow step reads or writes keeps its address for the life of the capture;
        # marking them static is what lets CUDA graph trees replay a step that mutates them in place.
        param = _static(flat.flats[PARAM][run.start:run.end])
        param.grad = _static(run_grads[index] if run_grads is not None else flat.grad_flat()[run.start:run.end])
        groups[g]["params"].append(param)
        state = shadow.state[param]
        for role, buffer in flat.flats.items():
            if role.kind == "state":
                state[role.key] = _static(buffer[run.start:run.end])
        # A run steps its own copy of the scalar state, then writes it to every member's slot. A view
        # of the member vector would alias the vector itself, and aliased inputs cannot be CUDA-graphed.
        first, stop = run.positions[0], run.positions[-1] + 1
        for key, vector in flat.scalars.items():
            scalar = _static(vector[first].clone())
            state[key] = scalar
            run_scalars.append((vector, first, scalar))
            if execution:
                broadcasts.append((vector, first, stop, scalar))
        if rebound:
            restores.append((state, [(key, state[key]) for key in rebound if key in state]))
    shadow.param_groups = [groups[g] for g in sorted(groups)]
    inner = unwrapped_step(optimizer)

    def step_runs() -> None:
        with torch.no_grad():
            inner(shadow)
            for state, entries in restores:
                for key, own in entries:
                    own.copy_(state[key])
                    state[key] = own
            for vector, start, stop, scalar in broadcasts:
                vector[start:stop].copy_(scalar.expand(stop - start))

    # A code object of its own per shadow, so Dynamo's per-code cache never mixes two captures.
    code = step_runs.__code__.replace(co_name=f"optcapture_step_{next(_shadow_ids)}")
    call = types.FunctionType(code, step_runs.__globals__, code.co_name, None, step_runs.__closure__)
    return ShadowStep(call, shadow, runs, set(tensor_hypers), run_scalars, groups, mirrored)


def frozen_hypers(optimizer: torch.optim.Optimizer, runs: list[Run], tensor_hypers: set[HyperKey],
                  followed: AbstractSet[HyperKey] = frozenset()) -> dict[HyperKey, Any]:
    """The hyperparameters the shadow holds as they were when it was built: the floats it reads as constants
    (compared by value) and the tensors the user gave (``lr=torch.tensor(0.01)``), which the shadow reads as
    those very objects: writing into one (``fill_``, what LR schedulers do) needs nothing, but a group entry
    replaced by another tensor must rebuild the capture (compared by identity)."""
    keys = hyper_candidates(optimizer, (run.key.group for run in runs)) - tensor_hypers - followed
    frozen = {key: optimizer.param_groups[key[0]][key[1]] for key in keys}
    for g in {run.key.group for run in runs}:
        for key, value in optimizer.param_groups[g].items():
            items = value if isinstance(value, tuple) else (value,)
            if key != "params" and any(isinstance(item, torch.Tensor) for item in items):
                frozen[(g, key)] = value
    return frozen


def followed_hypers(step: StepGraph, optimizer: torch.optim.Optimizer, runs: list[Run],
                    tensor_hypers: set[HyperKey]) -> set[HyperKey]:
    """Numbers of the param groups that must stay Python numbers (floats that steer control flow, like SGD's
    ``momentum``; an int the step counts itself, ``group["step"] += 1``) but that the real step already reads
    as a graph input, i.e. Dynamo made them dynamic after a change.

    The shadow follows them: their live value is written into its param group before each step, and
    Dynamo recompiles the shadow's frame once, to read them as inputs too, instead of optcapture
    rebuilding the capture at every change (a scheduler cycling ``momentum`` changes it every step).
    A change that flips the control flow fails the real step's own guard, which recaptures.
    """
    stepped = {run.key.group for run in runs}
    return {key for key in step.hypers_read - tensor_hypers if key[0] in stepped and key[1] not in NON_HYPER_KEYS
            and type(optimizer.param_groups[key[0]].get(key[1])) in (float, int)}


def _same_program(real: Hashable, shadow: Hashable) -> bool:
    """Event-for-event equality, except where the real graph reads a hyperparameter Dynamo made dynamic.

    There the real event holds a shared value computed from a hyperparameter input and the shadow
    (which specializes floats) holds a float constant; that position matches. Float constants of the
    real graph (e.g. anything derived from a tensor's shape) are still compared exactly.
    """
    if real == shadow:
        return True
    if isinstance(shadow, tuple) and len(shadow) == 3 and shadow[:2] in (("c", "float"), ("c", "int")) and \
            isinstance(real, tuple) and len(real) == 2 and real[0] in ("in", "op"):
        return real[0] == "op" or str(real[1]).startswith("hyper:")
    if isinstance(real, tuple) and isinstance(shadow, tuple) and len(real) == len(shadow):
        return all(_same_program(r, t) for r, t in zip(real, shadow, strict=True))
    return False


@dataclasses.dataclass
class BuiltShadow:
    """What :func:`build` hands to lowering and replay."""

    step: ShadowStep
    followed: set[HyperKey]
    """Numbers the shadow follows (:func:`followed_hypers`)."""
    frozen: dict[HyperKey, Any]
    """Values the capture holds as they were (:func:`frozen_hypers`): a change rebuilds it."""

    @property
    def tensor_hypers(self) -> set[HyperKey]:
        """The hyperparameters the shadow reads as device tensors."""
        return self.step.tensor_hypers


def build(step: StepGraph, optimizer: torch.optim.Optimizer, prepared: PreparedOptimizer, runs: list[Run],
          flats: dict[BucketKey, FlatGroup], run_grads: Sequence[torch.Tensor] | None,
          required_hypers: AbstractSet[HyperKey] = frozenset()) -> BuiltShadow:
    """The shadow step of ``runs``, proven to run each member's program, with its hyperparameters probed.

    ``run_grads``: as for :func:`build_shadow` (virtual grads must be backed by memory while this traces);
    ``required_hypers``: keys a rebuilt capture must still read as tensors. Raises :class:`CaptureError` when the
    shadow cannot be proven equivalent or a required key can no longer be a tensor.
    """
    # With the floats the real graph was traced with: a rebuild after a scheduler changed lr (which the capture
    # reads as a tensor, its guard dropped) is proven against the graph's constants, not the new value.
    rebound = sorted({rebind.key for rebind in step.rebinds})
    proof_shadow = build_shadow(optimizer, prepared, runs, flats, set(), execution=False, run_grads=run_grads,
                                values=step.traced_floats, rebound=rebound)
    proof_graph = hyper_probe.trace_only(proof_shadow.call)
    if proof_graph is None:
        raise CaptureError("the step does not trace as one graph over flat storage")
    mismatch = prove_equivalent(step, proof_graph, proof_shadow.shadow)
    if mismatch is not None:
        raise CaptureError(mismatch)

    def shadow_of(keys: set[HyperKey], chosen: Sequence[int]) -> Callable[[], None]:
        grads = None if run_grads is None else [run_grads[i] for i in chosen]
        return build_shadow(optimizer, prepared, [runs[i] for i in chosen], flats, keys, run_grads=grads,
                            rebound=rebound).call

    run_groups = [run.key.group for run in runs]
    tensor_hypers = hyper_probe.probe_tensor_hypers(optimizer, run_groups, hyper_candidates(optimizer, run_groups),
                                                    shadow_of)
    if not required_hypers <= tensor_hypers:
        raise CaptureError(f"hyperparameters {sorted(required_hypers - tensor_hypers)} can no longer be tensors")
    shadow = build_shadow(optimizer, prepared, runs, flats, tensor_hypers, run_grads=run_grads, rebound=rebound)
    followed = followed_hypers(step, optimizer, runs, tensor_hypers)
    return BuiltShadow(shadow, followed, frozen_hypers(optimizer, runs, tensor_hypers, followed))


def prove_equivalent(step: StepGraph, traced_shadow: TracedGraph, shadow: torch.optim.Optimizer) -> str | None:
    """None when every run of the shadow runs the same program as the real members; else why not.

    The shadow graph's inputs are mapped to the shadow's params, grads and state as stage 1 maps the real graph's
    (:func:`optcapture.input_roles.map_inputs`), and its lanes, one per run, are analyzed the same way.
    """
    assert step.lane_report is not None
    shadow_gm, examples = traced_shadow
    mapped = input_roles.map_inputs(shadow_gm, input_roles.input_values(shadow_gm, examples), shadow)
    if not mapped.present:
        return "the shadow step is not elementwise: it reads no grad of a run"
    shapes = {(g, i): shadow.param_groups[g]["params"][i].shape for g, members in mapped.present.items()
              for i in members}
    report = discovery.analyze_lanes(shadow_gm, mapped.lane_inputs, shapes)
    if not report.elementwise:
        return f"the shadow step is not elementwise: {report.reason}"
    real_groups = sorted({b.key.group for b in step.buckets})
    for shadow_g, members in sorted(mapped.present.items()):
        # Shadow group k holds the runs of the k-th real group that has runs; compared bucket by bucket.
        runs_of: dict[BucketKey, list[int]] = {}
        for i in sorted(members):
            p = shadow.param_groups[shadow_g]["params"][i]
            runs_of.setdefault(BucketKey(real_groups[shadow_g], p.device, p.dtype), []).append(i)
        for key, shadow_members in runs_of.items():
            real_bucket = next(b for b in step.buckets if b.key == key)
            program = step.lane_report.programs[(key.group, real_bucket.members[0])]
            if not all(_same_program(program, report.programs[(shadow_g, i)]) for i in shadow_members):
                return f"a run of bucket {key} would not run the members' program"
    return None
