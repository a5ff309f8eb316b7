"""Lane analysis: split a traced optimizer step into one program per parameter ("lane").

Used by discovery to prove that an update is elementwise and the same for every tensor of a
bucket, which is what makes it legal to run it once over flat storage.

Invariant: :func:`analyze` only reports ``elementwise=True`` when every op touching a lane is
on the pointwise allowlist, no op mixes two lanes, every lane value has its param's shape (or
is a 0-dim scalar), and so each lane's event list is a complete description of its update.
It reports ``lane_local=True`` (an update that may reduce or multiply within a param, like LAMB's trust ratio or
Muon's Newton-Schulz iteration, or that reads a number of each param's own state) only when no op mixes two lanes,
no op writes into a value shared by all lanes, no op draws random numbers and every lane op is a single-tensor op:
each lane's update is then a function of that lane's tensors and the shared values alone (:func:`lane_program`
extracts it).
The one exception is a cross-lane op (:data:`CROSS_LANE`, ``torch.stack`` of one value of each param, as a global
grad norm starts): it reads each of its lanes exactly once, in its list's order, and makes a value shared by all
lanes, so it is recorded (:attr:`LaneReport.cross_lanes`, and an ``("export", op)`` event in each lane's program)
instead of refused; the shared values computed from it are "crossed" (:attr:`LaneReport.crossed`) and may use any
op but a random one (they are computed once per step, as eager computes them).
Anything it does not understand makes it return both False with the reason.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

LaneId = tuple[int, int]  # (param group, index of the param in the group)

# Ops whose result at each element depends only on the same element of their tensor operands
# (and on 0-dim scalars). Foreach ops are normalized to these names (``_foreach_add_`` -> ``add``).
POINTWISE = frozenset(
    """abs add addcdiv addcmul clamp clamp_max clamp_min clone copy detach div eq exp expm1 fill fma ge
    gt le lerp log log1p logical_and logical_not logical_or lt maximum minimum mul ne neg pow reciprocal
    rsqrt sgn sigmoid sign sqrt square sub tanh to true_divide where zero float double half bfloat16
    iadd isub imul itruediv truediv floordiv mod full_like zeros_like ones_like conj conj_physical resolve_conj
    resolve_neg _get_data_attr masked_fill nan_to_num clip type_as""".split()
)
# Ops allowed only where no lane flows in: they compute one value shared by every lane from hyperparameters,
# numbers and the step's own counters (``bias_correction = 1 - beta1 ** step``, ``math.sqrt(...)`` on a number
# Dynamo made symbolic, a constant built with ``torch.tensor``/``full``). Random ops are not here: a shared
# random value would draw from the generator once for a bucket where eager draws once per tensor.
SHARED_ONLY = frozenset(
    """_sym_sqrt sym_sqrt sym_float sym_int sym_max sym_min sym_not sym_ite sym_sum floor ceil trunc round
    pow sqrt log log2 log10 exp cos sin tan atan tanh max min full zeros ones tensor scalar_tensor as_tensor
    empty fill_ eq ne lt le gt ge and_ or_ not_ truth neg pos abs""".split()
)
# Ops that produce nothing per element: allowed anywhere, they are recorded but never block.
NEUTRAL = frozenset({"_set_grad_enabled", "getitem", "item", "record_function", "_record_function_enter_new"})
# Foreach ops that are not pointwise but reduce each list item on its own (``_foreach_norm``).
FOREACH_LANE_LOCAL = frozenset({"norm"})
# Ops that gather one value of each lane into one value shared by all lanes, item i from list item i, copying each:
# ``torch.stack(norms)`` of a global grad norm. Stacking along dim 0 only, so that the items of a batch of lanes are
# one contiguous range of the result (:mod:`optcapture.cross_lane`).
CROSS_LANE = frozenset({"stack"})
# Ops that draw from a random generator: eager draws once per param, a batched program once per batch.
RANDOM = frozenset("""bernoulli dropout exponential geometric multinomial normal poisson rand rand_like randint
    randint_like randn randn_like randperm uniform""".split())


@dataclasses.dataclass(frozen=True)
class LaneReport:
    """What :func:`analyze` found."""

    elementwise: bool
    reason: str
    programs: Mapping[LaneId, tuple[Hashable, ...]]
    """Per lane, its events in graph order; equal tuples mean the same update program."""
    lane_local: bool = False
    """Every lane's update reads only its own tensors and shared values (true of every elementwise update)."""
    lane_of: Mapping[str, LaneId | None] = dataclasses.field(default_factory=dict)
    """Graph node name -> the lane it computes, or None for a value shared by all lanes (when ``lane_local``)."""
    foreach_lanes: Mapping[str, tuple[LaneId | None, ...]] = dataclasses.field(default_factory=dict)
    """Foreach node name -> the lane of each position of its lists (when ``lane_local``)."""
    cross_lanes: Mapping[str, tuple[LaneId, ...]] = dataclasses.field(default_factory=dict)
    """Cross-lane node name (:data:`CROSS_LANE`) -> the lane of each item of its list, in order, each once."""
    crossed: frozenset[str] = frozenset()
    """Names of the nodes computing shared values from a cross-lane op's result (the cross-lane nodes included)."""


@dataclasses.dataclass(frozen=True)
class _LaneValue:
    lane: LaneId
    key: Hashable  # ("in", role) or ("v", k)


@dataclasses.dataclass(frozen=True)
class _Shared:
    key: Hashable
    crossed: bool = False  # computed from a cross-lane op's result


@dataclasses.dataclass(frozen=True)
class _List:
    items: tuple[Any, ...]


class _Reject(Exception):
    pass


def _op_name(node: Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    if target is operator.getitem:
        return "getitem"
    return str(getattr(target, "__name__", target))


def _base_name(name: str) -> str:
    if name.startswith("_foreach_"):
        name = name[len("_foreach_") :]
    if name.endswith("_") and name not in ("_set_grad_enabled",):
        name = name[:-1]
    return name


def _scalar_key(value: Any) -> Hashable:
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.memory_format,
                          torch.layout)):
        return ("c", type(value).__name__, repr(value))
    if isinstance(value, (list, tuple)):
        return ("c", tuple(_scalar_key(v) for v in value))
    if isinstance(value, slice):
        return ("c", "slice", repr(value))
    raise _Reject(f"unsupported constant {type(value).__name__}")


class _Analyzer:
    def __init__(self, gm: GraphModule, inputs: Mapping[Node, tuple[LaneId | None, str]],
                 shapes: Mapping[LaneId, torch.Size]) -> None:
        self.gm = gm
        self.shapes = shapes
        self.values: dict[Node, Any] = {}
        self.programs: dict[LaneId, list[Hashable]] = {lane: [] for lane in shapes}
        self.not_elementwise: str | None = None  # why not, once seen; the analysis goes on for lane locality
        self.foreach_beyond_pointwise = False
        self.foreach_lanes: dict[str, tuple[LaneId | None, ...]] = {}
        self.cross_lanes: dict[str, tuple[LaneId, ...]] = {}
        for node, (lane, name) in inputs.items():
            self.values[node] = _Shared(("in", name)) if lane is None else _LaneValue(lane, ("in", name))
            if lane is not None and isinstance(node.meta.get("example_value"), (int, float, torch.SymInt,
                                                                                 torch.SymFloat)):
                # A number of the param's own state (``state["step"]``): one value per param, which flat runs
                # cannot hold; batches read it from a vector of one value per member.
                self._not_elementwise(f"the update of param {lane} reads a number of its own state ({node.name})")

    def _value(self, arg: Any) -> Any:
        if isinstance(arg, Node):
            if arg not in self.values:
                raise _Reject(f"node {arg.name} ({arg.op}) has no known role")
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            items = tuple(self._value(a) for a in arg)
            if any(isinstance(i, (_LaneValue, _List, _Shared)) for i in items):
                return _List(items)
            return _scalar_key(arg)
        return _scalar_key(arg)

    def _lanes_in(self, value: Any, into: set[LaneId]) -> None:
        if isinstance(value, _LaneValue):
            into.add(value.lane)
        elif isinstance(value, _List):
            for item in value.items:
                self._lanes_in(item, into)

    @staticmethod
    def _canon(value: Any, lane: LaneId | None) -> Hashable:
        if isinstance(value, _LaneValue):
            if value.lane != lane:
                raise _Reject("an op mixes two parameters")
            return value.key
        if isinstance(value, _Shared):
            return value.key
        if isinstance(value, _List):
            return ("list", tuple(_Analyzer._canon(v, lane) for v in value.items))
        constant: Hashable = value
        return constant

    def _not_elementwise(self, reason: str) -> None:
        if self.not_elementwise is None:
            self.not_elementwise = reason

    def _check_shape(self, lane: LaneId, example: Any) -> None:
        if isinstance(example, torch.Tensor) and example.dim() != 0 and example.shape != self.shapes[lane]:
            self._not_elementwise(f"a value of param {lane} has shape {tuple(example.shape)}, not the param's")

    def _emit(self, lane: LaneId | None, event: Hashable, example: Any, crossed: bool = False) -> Any:
        if lane is None:
            # Shared values are named by what computes them, so that two graphs can be compared.
            return _Shared(("op", event), crossed)
        self._check_shape(lane, example)
        program = self.programs[lane]
        program.append(event)
        return _LaneValue(lane, ("v", len(program)))

    def crossed(self) -> frozenset[str]:
        return frozenset(node.name for node, value in self.values.items() if _crossed(value))

    def lane_of(self) -> dict[str, LaneId | None]:
        """Node name -> its lane, or None for shared values; foreach results (lists) are left out."""
        found: dict[str, LaneId | None] = {}
        for node, value in self.values.items():
            if isinstance(value, _LaneValue):
                found[node.name] = value.lane
            elif isinstance(value, _Shared):
                found[node.name] = None
        return found

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr") and node not in self.values:
                example = node.meta.get("example_value")
                if isinstance(example, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                    # E.g. a grad that is a strided slice of a bigger tensor (Dynamo passes its stride), or an int
                    # the step reads that changed between calls.
                    raise _Reject(f"Dynamo passes a number as a symbolic input ({node.name}: a size, stride or int "
                                  "it made dynamic)")
                raise _Reject(f"input {node.name} is not a param, grad, state or hyperparameter of the optimizer")
            if node.op in ("call_function", "call_method"):
                self.values[node] = self._call(node)

    def _call(self, node: Node) -> Any:
        name = _op_name(node)
        base = _base_name(name)
        if name == "getitem":
            container, index = node.args
            value = self._value(container)
            if isinstance(value, _List) and isinstance(index, int):
                return value.items[index]
        args = [self._value(a) for a in node.args]
        kwargs = {k: self._value(v) for k, v in node.kwargs.items()}
        touched: set[LaneId] = set()
        for value in (*args, *kwargs.values()):
            self._lanes_in(value, touched)
        crossed = any(_crossed(value) for value in (*args, *kwargs.values()))
        if base in RANDOM and (touched or crossed):
            raise _Reject(f"op {name!r} draws random numbers for each param")
        if base in CROSS_LANE and touched:
            return self._cross_lane(node, name, args, kwargs)
        if base not in POINTWISE and base not in NEUTRAL:
            if touched:
                self._not_elementwise(f"op {name!r} is not elementwise")
                self.foreach_beyond_pointwise |= name.startswith("_foreach_") and base not in FOREACH_LANE_LOCAL
            elif base not in SHARED_ONLY and name not in SHARED_ONLY and not crossed:
                raise _Reject(f"op {name!r} is not elementwise and computes no per-param value")
        written = written_argument(node, name)
        if touched and written is not None and not _per_param(self._value(written), "out" in node.kwargs):
            # E.g. ``total.add_(p.grad.norm())``: a value shared by all params accumulates every param's. (Not
            # ``torch.div(lr, denom, out=denom)``, pytorch_optimizer's AdaBound: the param's own value is written.)
            raise _Reject(f"op {name!r} writes a per-param value into a value shared by all params")
        example = node.meta.get("example_value")
        if name.startswith("_foreach_"):
            return self._foreach(node, base, args, kwargs, example)
        if len(touched) > 1:
            raise _Reject(f"op {name!r} mixes params {sorted(touched)}")
        lane = next(iter(touched)) if touched else None
        event = (name, tuple(self._canon(a, lane) for a in args),
                 tuple(sorted((k, self._canon(v, lane)) for k, v in kwargs.items())))
        return self._emit(lane, event, example, crossed)

    def _cross_lane(self, node: Node, name: str, args: list[Any], kwargs: dict[str, Any]) -> _Shared:
        """``stack(items)`` of one value of each of its lanes: recorded, with an export event in each lane."""
        items = args[0].items if args and isinstance(args[0], _List) else ()
        lanes = tuple(item.lane for item in items if isinstance(item, _LaneValue))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rest: set[LaneId] = set()
        for value in (*args[1:], *kwargs.values()):
            self._lanes_in(value, rest)
        if not lanes or len(lanes) != len(items) or len(set(lanes)) != len(lanes) or rest or dim != 0:
            raise _Reject(f"op {name!r} mixes params {sorted(set(lanes) | rest)} (a cross-param op must stack, along "
                          "dim 0, one value of each param, each once)")
        for item in items:
            assert isinstance(item, _LaneValue)
            self.programs[item.lane].append(("export", item.key))
        self.cross_lanes[node.name] = lanes
        self._not_elementwise(f"op {name!r} reduces across params")
        return _Shared(("cross", node.name), crossed=True)

    def _foreach(self, node: Node, base: str, args: list[Any], kwargs: dict[str, Any], example: Any) -> Any:
        lengths = {len(a.items) for a in (*args, *kwargs.values()) if isinstance(a, _List)}
        if len(lengths) != 1:
            raise _Reject(f"foreach op {node.target} has lists of different lengths")
        (length,) = lengths
        if base in ("addcmul", "addcdiv") and len(node.args) > 3 and not isinstance(args[3], _List) \
                and isinstance(_example(node.args[3]), torch.Tensor):
            # The ScalarList-as-tensor overload: one scalar per position, not one value for all.
            raise _Reject(f"foreach op {node.target} takes one scalar per param from a tensor")
        outputs = []
        lanes_at: list[LaneId | None] = []
        for j in range(length):
            def at(value: Any, j: int = j) -> Any:
                return value.items[j] if isinstance(value, _List) else value
            pos_args = [at(a) for a in args]
            pos_kwargs = {k: at(v) for k, v in kwargs.items()}
            lanes: set[LaneId] = set()
            for value in (*pos_args, *pos_kwargs.values()):
                self._lanes_in(value, lanes)
            if len(lanes) > 1:
                raise _Reject(f"foreach op {node.target} mixes params {sorted(lanes)} at position {j}")
            lane = next(iter(lanes)) if lanes else None
            lanes_at.append(lane)
            event = ("foreach." + base, tuple(self._canon(a, lane) for a in pos_args),
                     tuple(sorted((k, self._canon(v, lane)) for k, v in pos_kwargs.items())))
            item_example = example[j] if isinstance(example, (list, tuple)) and len(example) > j else None
            outputs.append(self._emit(lane, event, item_example, any(_crossed(v) for v in pos_args)))
        self.foreach_lanes[node.name] = tuple(lanes_at)
        return _List(tuple(outputs))


def _crossed(value: Any) -> bool:
    if isinstance(value, _Shared):
        return value.crossed
    return isinstance(value, _List) and any(_crossed(item) for item in value.items)


def _example(arg: Any) -> Any:
    return arg.meta.get("example_value") if isinstance(arg, Node) else arg


def called_name(node: Node) -> str:
    """The name of the op a call node calls (as :func:`in_place` and the op sets above take it); "" for a node that
    calls nothing (a placeholder's target is its own name, which may well end in ``_``)."""
    return _op_name(node) if node.op in ("call_function", "call_method") else ""


# Ops that give their first argument's values, as a copy or a view (``p.clone()``, ``p.view(-1)``).
MOVES_NO_VALUE = frozenset({"clone", "contiguous", "detach", "to", "_to_copy", "alias", "view", "view_as", "reshape",
                            "flatten"})


def input_behind(value: Any, through_in_place: bool = False) -> Node | None:
    """The graph input (placeholder or attribute) whose values ``value`` has, through ops of :data:`MOVES_NO_VALUE`
    (and, ``through_in_place``, in-place ops, whose result is their first argument: the input they wrote); None if
    an op on the way computes anything else."""
    while isinstance(value, Node) and value.op in ("call_function", "call_method"):
        name = called_name(value)
        if name not in MOVES_NO_VALUE and not (through_in_place and in_place(name)):
            return None
        value = value.args[0] if value.args else None
    return value if isinstance(value, Node) and value.op in ("placeholder", "get_attr") else None


def in_place(name: str) -> bool:
    """Whether the op named ``name`` writes its first argument in place (``add_``, ``_foreach_mul_``, ``copy_``; not a
    dunder such as ``__and__``)."""
    return name.endswith("_") and not name.startswith("__")


def _per_param(value: Any, strict: bool) -> bool:
    """A per-param value, or a list of them (``strict``: every item; else a foreach op's list, checked per item by
    :meth:`_Analyzer._foreach`)."""
    if isinstance(value, _List):
        return not strict or all(isinstance(item, _LaneValue) for item in value.items)
    return isinstance(value, _LaneValue)


def written_argument(node: Node, name: str) -> Any:
    """What the op writes: its ``out=`` (a tuple of several for ops with several outputs), else its first argument
    if it works in place; None if it writes none of its arguments."""
    if "out" in node.kwargs:
        return node.kwargs["out"]
    return node.args[0] if in_place(name) and node.args else None


def analyze(gm: GraphModule, inputs: Mapping[Node, tuple[LaneId | None, str]],
            shapes: Mapping[LaneId, torch.Size]) -> LaneReport:
    """Split ``gm`` into per-lane programs.

    inputs: every placeholder and get_attr node -> (lane, role name) for per-param tensors, or
        (None, role name) for shared values (hyperparameters).
    shapes: every lane -> its param's shape.
    """
    analyzer = _Analyzer(gm, inputs, shapes)
    try:
        analyzer.run()
    except _Reject as rejection:
        return LaneReport(False, str(rejection), {})
    programs = {lane: tuple(events) for lane, events in analyzer.programs.items()}
    if analyzer.not_elementwise is None:
        return LaneReport(True, "", programs, lane_local=True, lane_of=analyzer.lane_of(),
                          foreach_lanes=analyzer.foreach_lanes)
    if analyzer.foreach_beyond_pointwise:
        return LaneReport(False, f"{analyzer.not_elementwise} (in a foreach op)", programs)
    return LaneReport(False, analyzer.not_elementwise, programs, lane_local=True, lane_of=analyzer.lane_of(),
                      foreach_lanes=analyzer.foreach_lanes, cross_lanes=analyzer.cross_lanes,
                      crossed=analyzer.crossed())
