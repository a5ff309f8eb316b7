"""Stage 1, discovery: find the optimizer a graph Dynamo hands us belongs to, and bucket its params.

Each input gets its role (:mod:`optcapture.input_roles`), the update is proved elementwise or lane-local
(:mod:`optcapture.lanes`), and whatever keeps the graph off the bucketed path is recorded, with its reason, in
:attr:`StepGraph.blockers`. Buckets are param group x device x dtype over the params that have a grad in this graph.

Invariant: discovery never mutates the optimizer, its tensors or the graph it is handed; it only reads. A step that
assigns new tensors to its state entries is analyzed as the copy of its graph that writes them in place
(:mod:`optcapture.state_rebinds`), which :attr:`StepGraph.graph` hands on. Its
:class:`StepGraph` is what ``TORCH_LOGS="optcapture"`` and :func:`optcapture.explain` report.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from optcapture import _compat, compile_hazards, dtensors, lanes, reach, state_rebinds
from optcapture.eligible import not_bucketable_because
from optcapture.graph_outputs import host_outputs
from optcapture.input_roles import InputRole, input_values, map_inputs, state_of

log = logging.getLogger(__name__)

UpdateKind = Literal["elementwise", "lane-local"]
"""``elementwise``: each element of a param is updated from the same element of its tensors (flat runs);
``lane-local``: each param is updated from its own tensors alone, reductions included (batches of one shape)."""

_OPTIMIZER_KINDS = frozenset({"state", "scalar_state", "hyper", "global_state"})


@dataclasses.dataclass(frozen=True)
class BucketKey:
    group: int
    device: torch.device
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Params of one group, device and dtype that have a grad in this graph, in group order."""

    key: BucketKey
    members: tuple[int, ...]
    numel: int


@dataclasses.dataclass
class StepGraph:
    """Everything discovery learned about one captured graph (it holds the optimizer weakly)."""

    optimizer_ref: weakref.ref[torch.optim.Optimizer] | None
    frame_is_step: bool
    roles: list[InputRole]
    buckets: list[Bucket]
    lane_report: lanes.LaneReport | None
    blockers: list[str]
    """Why this graph cannot take the bucketed path; empty when it can."""
    attribute_stores: list[tuple[weakref.ref[torch.optim.Optimizer], str, Any]] = dataclasses.field(
        default_factory=list)
    """Attribute assignments on the optimizer that Dynamo does not write back (see
    :func:`optcapture._compat.optimizer_attribute_stores`): (optimizer, name, value or ``NOT_CONSTANT``)."""
    returns_tensors: bool = False
    """Whether the graph has outputs (tensors the frame keeps, e.g. lazily created state)."""
    is_optimizer_graph: bool = True
    """False for a graph that is no piece of an optimizer step: it is not the step's own frame, reads no optimizer
    state or hyperparameter and writes no param (the forward of a whole training step, grad clipping)."""
    traced_floats: dict[tuple[int, str], Any] = dataclasses.field(default_factory=dict)
    """(group, key) -> each float (or tuple of floats) of the param groups as the graph was traced with it."""
    lazy_state: bool = False
    """The first step of an optimizer that creates its state inside ``step()``: this call runs the graph as traced
    (the state it creates changes the guards) and the next call is captured."""
    graph_break: str | None = None
    """The graph break this graph of the step's own frame ends at (its first line), where Dynamo compiles the rest of
    the step as a function of its own; None when the graph ends with the frame."""
    called_by: weakref.ref[torch.optim.Optimizer] | None = None
    """With no optimizer in reach of the frame: the optimizer whose ``step()`` runs below it on the Python stack
    (Dynamo gave the step's own frame up and compiles a function it calls, as timm's NAdamW's update function on the
    CPU), which its report goes to."""
    graph: GraphModule | None = None
    """The graph discovery analyzed and the later stages compile: the one Dynamo handed over, or its copy that
    stores the state the step rebinds in place (:mod:`optcapture.state_rebinds`)."""
    rebinds: tuple[state_rebinds.StateRebind, ...] = ()
    """The state entries the step assigns new tensors to, which :attr:`graph` writes in place."""
    miscompiled: str | None = None
    """Why ``torch.compile`` would compute this graph wrong (:mod:`optcapture.compile_hazards`): it then runs as
    traced."""

    @property
    def update(self) -> UpdateKind | None:
        """How the update reads its tensors, when it can be bucketed at all (see :mod:`optcapture.lanes`)."""
        report = self.lane_report
        if report is None:
            return None
        return "elementwise" if report.elementwise else "lane-local" if report.lane_local else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer_ref() if self.optimizer_ref is not None else None

    @property
    def reported_to(self) -> torch.optim.Optimizer | None:
        """The optimizer whose reports this graph's report joins: its own, or the one whose step called its frame."""
        ref = self.optimizer_ref or self.called_by
        return ref() if ref is not None else None

    @property
    def hypers_read(self) -> set[tuple[int, str]]:
        """(group, key) of each hyperparameter the graph reads as an input rather than as a constant."""
        return {(role.group, role.key) for role in self.roles
                if role.kind == "hyper" and role.group is not None and role.key is not None}

    @property
    def lanes_of_bucket(self) -> dict[BucketKey, list[lanes.LaneId]]:
        return {b.key: [(b.key.group, i) for i in b.members] for b in self.buckets}

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for role in self.roles:
            kinds[role.kind] = kinds.get(role.kind, 0) + 1
        name = type(self.optimizer).__name__ if self.optimizer is not None else "no optimizer"
        buckets = ", ".join(f"g{b.key.group}/{b.key.device}/{b.key.dtype}: {len(b.members)} tensors"
                            for b in self.buckets)
        return f"{name}: {len(self.roles)} inputs {kinds}, {len(self.buckets)} bucket(s) [{buckets}]"


def changed_since_traced(step: StepGraph) -> str | None:
    """Why the optimizer's params no longer fit the buckets of the traced graph, or None. A capture rebuilt
    over the same graph needs each param at the dtype and device it was traced with; ``model.half()`` or
    ``model.to(device)`` swaps a param's storage without always failing Dynamo's guards of the step's frame."""
    optimizer = step.optimizer
    if optimizer is None:
        return "the optimizer no longer exists"
    for bucket in step.buckets:
        g = bucket.key.group
        params = optimizer.param_groups[g]["params"] if g < len(optimizer.param_groups) else []
        for i in bucket.members:
            if i >= len(params):
                return f"param {i} of group {g} is no longer in the optimizer"
            p = params[i]
            if p.dtype != bucket.key.dtype or p.device != bucket.key.device:
                return (f"param {i} of group {g} is now {p.dtype} on {p.device}, traced as {bucket.key.dtype} on "
                        f"{bucket.key.device} (model.half(), .to(...)); torch._dynamo.reset() lets the next "
                        "compiled step trace and capture it again")
    return None


def no_longer_bucketable(step: StepGraph) -> list[str]:
    """Why params of the traced graph's buckets can no longer move into flat storage (empty: they all can): a
    ``p.data = ...`` since the capture made one a view of a larger buffer (``vector_to_parameters``) or gave it
    storage another tensor holds. The graph itself still steps them right, per tensor."""
    optimizer = step.optimizer
    if optimizer is None:
        return []
    groups = optimizer.param_groups
    return [reason for bucket in step.buckets
            for reason in _refused(groups[bucket.key.group]["params"], bucket.members, bucket.key.group)]


def _refused(params: Sequence[torch.Tensor], indices: Sequence[int], group: int) -> list[str]:
    """Why each of ``params[i]`` (``i`` in ``indices``, of param group ``group``) cannot move into flat storage."""
    shards = dtensors.fsdp_shards([params[i] for i in indices])  # once for all: it walks every FSDP2 state
    by_reason: dict[str, list[int]] = {}
    for i in indices:
        why = not_bucketable_because(params[i], shards)
        if why is not None:
            by_reason.setdefault(why, []).append(i)
    # One line per reason, naming every param it holds for (a kept model.state_dict() holds them all).
    return [f"param {members[0]} of group {group} {why}" if len(members) == 1
            else f"params {_ranges(members)} of group {group}: each {why}" for why, members in by_reason.items()]


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def cycles_momentum(group: dict[str, Any]) -> bool:
    """Whether OneCycleLR or CyclicLR (``cycle_momentum=True``) cycles this param group's momentum: they mark the
    groups they cycle with ``base_momentum`` and ``max_momentum``."""
    return "base_momentum" in group and "max_momentum" in group


def cycled_floats_held_constant(step: StepGraph) -> set[tuple[int, str]]:
    """(group, key) of each float a scheduler cycles that the graph holds as a constant, so each new value would
    recompile the step: OneCycleLR and CyclicLR (``cycle_momentum=True``) mark the groups they cycle with
    ``base_momentum``/``max_momentum`` and write ``betas[0]`` (a device tensor here: nothing to do) or ``momentum``
    (a float: it steers control flow) (torch/optim/lr_scheduler.py)."""
    optimizer = step.optimizer
    if optimizer is None:
        return set()
    cycled = set()
    for g in sorted({b.key.group for b in step.buckets}):
        group = optimizer.param_groups[g]
        if cycles_momentum(group) and "betas" not in group and type(group.get("momentum")) is float:
            cycled.add((g, "momentum"))
    return cycled - step.hypers_read


def _floats_of_groups(optimizer: torch.optim.Optimizer | None) -> dict[tuple[int, str], Any]:
    if optimizer is None:
        return {}
    return {(g, key): value for g, group in enumerate(optimizer.param_groups) for key, value in group.items()
            if type(value) is float or (type(value) is tuple and value and all(type(v) is float for v in value))}



def analyze_lanes(gm: GraphModule, lane_inputs: Mapping[Node, tuple[lanes.LaneId | None, str]],
                  shapes: Mapping[lanes.LaneId, torch.Size]) -> lanes.LaneReport:
    """:func:`optcapture.lanes.analyze`, where a failure of the analysis is a report that proves nothing."""
    try:
        return lanes.analyze(gm, lane_inputs, shapes)
    except Exception as error:  # noqa: BLE001 - a graph the analysis did not foresee: not bucketed, said once
        return lanes.LaneReport(False, f"the analysis failed ({type(error).__name__}: {error})", {})


_CLOSURE_COUPLED = (torch.optim.LBFGS,)


def discover(gm: GraphModule, example_inputs: Sequence[Any], tracer: Any | None = None,
             require_step_frame: bool = True) -> StepGraph:
    """Map the inputs of ``gm`` to roles and group the params into buckets."""
    tracer = tracer if tracer is not None else _compat.current_tracer()
    blockers: list[str] = []
    local_values = dict(tracer.f_locals) if tracer is not None else {}
    candidates = reach.candidate_optimizers([*local_values.values(), *reach.globals_read(tracer)])

    values = input_values(gm, example_inputs)

    tensor_ids = {id(v) for v in values.values() if isinstance(v, torch.Tensor)}
    owners = [opt for opt in candidates
              if any(id(p) in tensor_ids or (p.grad is not None and id(p.grad) in tensor_ids)
                     for g in opt.param_groups for p in g["params"])]
    optimizer = owners[0] if len(owners) == 1 else None
    called_by = None
    if optimizer is None and not candidates and tracer is not None:
        # E.g. SGD stepped first with every grad None: Dynamo gives up on the step's frame and compiles
        # ``_single_tensor_sgd`` on its own, with params and buffers as plain arguments.
        stepping = reach.optimizer_stepping_below()
        if stepping is None:
            blockers.append(f"no optimizer is in reach of the compiled frame {tracer.f_code.co_name!r} (Dynamo "
                            "compiled a function called by the step on its own, or the function updates params "
                            "without an optimizer)")
        else:
            called_by = weakref.ref(stepping)
            blockers.append(f"Dynamo compiled {tracer.f_code.co_name!r}, which the step of {type(stepping).__name__} "
                            "calls, as a frame of its own: it gave the step's own frame up (a graph break there; "
                            "TORCH_LOGS=graph_breaks says why), so no graph holds the whole step")
    elif optimizer is None:
        blockers.append("the graph does not belong to exactly one optimizer"
                        + (f" (found {len(owners)})" if owners else ""))
    frame_is_step = bool(optimizer is not None and tracer is not None
                         and tracer.f_code in reach.step_codes(optimizer)
                         and optimizer in reach.candidate_optimizers(local_values.values()))
    if isinstance(optimizer, _CLOSURE_COUPLED):
        # LBFGS's step calls the closure in a loop (line search) and keeps per-step history in Python: no
        # single elementwise update to bucket. Its frames reach the backend one piece at a time.
        blockers.append(f"{type(optimizer).__name__} is closure-coupled (its step re-evaluates the closure "
                        "and keeps a Python history); its pieces run per tensor")
    elif optimizer is not None and not frame_is_step and require_step_frame:
        inherited = next((cls for cls in type(optimizer).__mro__[1:] if tracer is not None
                          and tracer.f_code in reach.codes_of(cls.__dict__.get("step"))), None)
        if inherited is not None:
            # Bucketing it would run the subclass's whole step in the shadow, on top of the subclass's own frames.
            blockers.append(f"the compiled frame is {inherited.__name__}.step, called by the step that "
                            f"{type(optimizer).__name__} overrides (a subclass that overrides step() runs per tensor)")
        elif (resumed := _compat.resumed_after_graph_break(tracer)) is not None:
            blockers.append(f"the step has a graph break: this graph is the part of {resumed.function}() after line "
                            f"{resumed.line}, which Dynamo compiles as a function of its own, and each part runs "
                            "per tensor (TORCH_LOGS=graph_breaks says why Dynamo broke the graph there)")
        else:
            blockers.append("the compiled function is not the optimizer's own step (a user function that "
                            "calls step() is compiled as a whole graph)")

    mapped = map_inputs(gm, values, optimizer)
    rebinds: state_rebinds.InPlace | state_rebinds.NoRebinds | None = None
    if optimizer is not None and tracer is not None:
        rebinds = state_rebinds.stored_in_place_if_rebound(gm, optimizer, mapped.roles, tracer)
        if isinstance(rebinds, state_rebinds.InPlace):
            gm = rebinds.graph
            values = input_values(gm, example_inputs)
            mapped = map_inputs(gm, values, optimizer)
    roles, present = mapped.roles, mapped.present
    miscompiled = compile_hazards.hazard(gm)
    if miscompiled is not None:
        blockers.append(f"torch.compile would compute it wrong: {miscompiled}")

    buckets: list[Bucket] = []
    grad_owners: dict[int, tuple[int, int]] = {}
    if optimizer is not None:
        for g, group in enumerate(optimizer.param_groups):
            if group.get("differentiable"):
                blockers.append("differentiable=True is not captured")
            if group.get("fused"):
                blockers.append("fused=True is not captured (its kernel is already fused; run it eagerly)")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                owner = grad_owners.setdefault(id(p.grad), (g, i))
                if owner != (g, i):
                    # Dynamo passes one tensor once: the second param would have no grad input of its own.
                    blockers.append(f"param {i} of group {g} shares its grad tensor with param {owner[1]} of group "
                                    f"{owner[0]}")
            by_key: dict[BucketKey, list[int]] = {}
            blockers.extend(_refused(group["params"], sorted(present.get(g, [])), g))
            for i in sorted(present.get(g, [])):
                p = group["params"][i]
                assert p.grad is not None
                if p.grad.is_sparse or p.layout != torch.strided:
                    blockers.append(f"param {i} of group {g} has a sparse grad or layout")
                if p.grad.dtype != p.dtype or p.grad.device != p.device or p.grad.shape != p.shape:
                    blockers.append(f"grad of param {i} of group {g} differs from its param in dtype, device or shape")
                differs = dtensors.differs_because(p, p.grad, "its grad")
                if differs is not None:
                    blockers.append(f"param {i} of group {g}: {differs}")
                by_key.setdefault(BucketKey(g, p.device, p.dtype), []).append(i)
            for bucket_key, members in by_key.items():
                numel = sum(dtensors.local(group["params"][i]).numel() for i in members)
                buckets.append(Bucket(bucket_key, tuple(members), numel))

    report = None
    if optimizer is not None and not blockers:
        shapes = {(b.key.group, i): optimizer.param_groups[b.key.group]["params"][i].shape
                  for b in buckets for i in b.members}
        report = analyze_lanes(gm, mapped.lane_inputs, shapes)
        if not report.elementwise and not report.lane_local:
            blockers.append(f"the update is not provably elementwise: {report.reason}")
        elif not report.elementwise and any(dtensors.is_dtensor(optimizer.param_groups[b.key.group]["params"][i])
                                            for b in buckets for i in b.members):
            blockers.append(f"the update is not elementwise ({report.reason}) and its params are DTensors: a reduction "
                            "over a DTensor spans every rank's shard, so it is not stepped shard by shard")
        elif report.elementwise:
            for bucket in buckets:
                programs = {report.programs[(bucket.key.group, i)] for i in bucket.members}
                if len(programs) != 1:
                    blockers.append(f"params of bucket {bucket.key} run different update programs")
    attribute_stores = _compat.optimizer_attribute_stores(tracer) if tracer is not None else []
    # A frame that assigns attributes of an optimizer needs the write-back whatever else it does.
    is_optimizer_graph = (tracer is None or frame_is_step or bool(attribute_stores)
                          or any(role.kind in _OPTIMIZER_KINDS for role in roles)
                          or reach.touches_optimizer(gm, values, candidates))
    if attribute_stores:
        # The one reason that matters: such a step is never compiled as a whole, so others would only add noise.
        names = ", ".join(sorted({name for _, name, _ in attribute_stores}))
        blockers[:] = [f"the step assigns attributes of the optimizer ({names}), which Dynamo does not write back "
                       "for torch.optim.Optimizer objects"]
    # New tensors only: a number the frame writes back (``group["step"] = s0 + 1``) is no state it keeps.
    returns_tensors = host_outputs(gm) is None
    # The first step of an optimizer that creates its state inside step(): the state it creates changes the guards
    # and the next call is captured. Tensors returned by a step whose params all have state are no such thing.
    lazy_state = returns_tensors and is_optimizer_graph and (optimizer is None or any(
        not state_of(optimizer, optimizer.param_groups[b.key.group]["params"][i]) for b in buckets for i in b.members))
    if returns_tensors and is_optimizer_graph and not lazy_state:
        why = f": {rebinds.reason}" if isinstance(rebinds, state_rebinds.NoRebinds) else ""
        blockers.append("the step returns new tensors to its frame every step (Python state Dynamo rebuilds from "
                        f"the graph's outputs){why}")
    step = StepGraph(weakref.ref(optimizer) if optimizer is not None else None, frame_is_step, roles,
                     buckets, report, blockers,
                     [(weakref.ref(owner), name, value) for owner, name, value in attribute_stores], returns_tensors,
                     is_optimizer_graph, _floats_of_groups(optimizer), lazy_state,
                     _compat.graph_break_ending(tracer) if frame_is_step else None, called_by, gm,
                     rebinds.rebinds if isinstance(rebinds, state_rebinds.InPlace) else (), miscompiled)
    log.info("discovered %s", step.summary())
    for role in roles:
        log.debug("  role %s", role.describe())
    for reason in blockers:
        log.info("  not bucketed: %s", reason)
    return step
