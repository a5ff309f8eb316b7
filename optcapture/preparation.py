"""Stage 2, preparation: give every bucketed param, grad and state tensor a stable home in flat storage.

For each param group x device x dtype, optcapture owns one flat buffer per role (param, grad, and
each per-param state key, in the params' dtype or in the one other dtype all of that key's tensors have: a
bfloat16 momentum beside float32 params) and one vector per scalar-state key (step counters, ...). The user's
tensors are *re-homed* into it: the same tensor objects (``nn.Parameter`` identity, ``state``
entries) now use a storage of exactly their own size that points into the flat buffer and keeps it
alive. So ``torch.save``/safetensors see one tensor per storage, ``copy.deepcopy`` copies only the
tensor, and Dynamo's identity guards keep holding.

Moving a role into flat storage never holds the whole role twice: on CPU the flat buffer is allocated
untouched (the OS backs a page only once it is written) and each old tensor is released as soon as it is
copied; on an accelerator the role is first staged in host memory and released, then the flat buffer is
allocated and filled (:func:`_move_into_flat`).

Invariant: after :func:`prepare`, every re-homed tensor has the value it had before, and each
member's slot in every flat buffer of its group is at the same offset. Nothing here runs per step except
:meth:`PreparedOptimizer.refresh_hypers`, which :mod:`optcapture.replay` calls. The tables through which a step
reads grads where autograd left them are :mod:`optcapture.grad_tables`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch

from optcapture import _compat, dtensors
from optcapture.config import CaptureConfig
from optcapture.discovery import BucketKey, StepGraph
from optcapture.eligible import FLAT_STORAGE, HOME_STORAGE, bucketable
from optcapture.errors import CaptureError
from optcapture.input_roles import is_per_element_state, per_element_state_keys
from optcapture.slots import Stride, alias, own_stride, same_order

log = logging.getLogger(__name__)

# What param groups hold for LR schedulers and users, not for the step.
BOOKKEEPING_KEYS = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
                              "max_momentum"})
# Keys of a param group that are never hyperparameters of the update itself.
NON_HYPER_KEYS = BOOKKEEPING_KEYS | {"foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad",
                                    "nesterov", "centered", "decoupled_weight_decay"}


RoleKind = Literal["param", "grad", "state", "scalar"]


@dataclasses.dataclass(frozen=True)
class Role:
    """What one flat buffer of a bucket holds: its params, their grads, one per-element state key (``exp_avg``:
    a tensor of each param's shape) or one scalar-state key (``step``: one element per param)."""

    kind: RoleKind
    key: str | None = None  # the ``optimizer.state`` key of a "state" or "scalar" role


PARAM = Role("param")
GRAD = Role("grad")


@dataclasses.dataclass
class FlatGroup:
    """Flat storage of one param group x device x dtype (all its eligible params, present or not)."""

    key: BucketKey
    params: list[torch.Tensor]  # members in group order (weakly meaningful: Dynamo guards identity)
    param_indices: list[int]
    offsets: list[int]
    shapes: list[torch.Size]  # per member: the shape of what its slot holds (a DTensor's local shard)
    strides: list[Stride | None]  # per member: its param's strides where not the contiguous ones (own_stride)
    numel: int
    flats: dict[Role, torch.Tensor]  # PARAM, each "state" role, and GRAD once made -> flat buffer
    scalars: dict[str, torch.Tensor]  # scalar-state key -> vector with one entry per member
    homes: dict[Role, list[torch.Tensor]]  # role -> per member: the alias the user's tensor was re-homed to
    grad_homes: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per member: its grad slot
    # ids of the state tensors left where they were when this storage was built (another shape, device or element
    # order than their param's, another dtype than their slot's; :func:`prepare` refuses the group): while exactly
    # these stay there, the storage is current and a new capture attempt does not move every tensor again only to
    # be refused again.
    left_elsewhere: frozenset[int] = frozenset()

    def slot(self, member: int) -> slice:
        start = self.offsets[member]
        return slice(start, start + math.prod(self.shapes[member]))

    def grad_flat(self) -> torch.Tensor:
        """Flat grad storage, made on first use: only captures that copy grads need it (a grad-table capture
        reads grads where they are, so it costs no grad-sized buffer)."""
        flat = self.flats.get(GRAD)
        if flat is None:
            flat = self.flats[GRAD] = _flat_buffer(self.numel, self.key, [(o, math.prod(shape)) for shape, o in
                                                                         zip(self.shapes, self.offsets, strict=True)])
            self.grad_homes = [alias(flat, offset, shape, stride) for shape, stride, offset
                               in zip(self.shapes, self.strides, self.offsets, strict=True)]
        return flat


@dataclasses.dataclass
class HyperSlots:
    """Device tensors holding the hyperparameters the captured step reads, one per (group, key[, i])."""

    tensors: dict[tuple[int, str, int | None, torch.device], torch.Tensor]
    last: dict[tuple[int, str, int | None, torch.device], float]


class PreparedOptimizer:
    """Everything preparation owns for one optimizer; shared by all captures of that optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: CaptureConfig) -> None:
        self.optimizer_ref = weakref.ref(optimizer)
        self.config = config
        self.groups: dict[BucketKey, FlatGroup] = {}
        self.hypers = HyperSlots({}, {})

    def flat_group(self, key: BucketKey) -> FlatGroup:
        optimizer = self.optimizer_ref()
        assert optimizer is not None
        flat = self.groups.get(key)
        if flat is None or not _still_homed(flat, optimizer):
            flat = _build_flat_group(optimizer, key, self.config.align_elements)
            flat.left_elsewhere = frozenset(id(value) for _, _, value in _states_elsewhere(flat, optimizer))
            self.groups[key] = flat
        return flat

    def hyper(self, group: int, key: str, index: int | None, device: torch.device, value: float) -> torch.Tensor:
        slot = (group, key, index, device)
        tensor = self.hypers.tensors.get(slot)
        if tensor is None:
            # float64: eager computes ``1 - beta2`` from the Python float; from float32(0.999) it is 1.3e-5 off.
            tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
            _compat.mark_static(tensor)
            self.hypers.tensors[slot] = tensor
            self.hypers.last[slot] = float(value)
        return tensor

    def refresh_hypers(self) -> None:
        """Write the live values of the param groups into the hyperparameter tensors (only changed ones)."""
        optimizer = self.optimizer_ref()
        if optimizer is None:
            return
        groups = optimizer.param_groups
        last = self.hypers.last
        for slot, tensor in self.hypers.tensors.items():
            group, key, index, _ = slot
            value = groups[group][key]
            if index is not None:
                value = value[index]
            value = float(value)
            if last[slot] != value:
                tensor.fill_(value)
                last[slot] = value


def _still_homed(flat: FlatGroup, optimizer: torch.optim.Optimizer) -> bool:
    """True while every member, and each of its state tensors, still lives in ``flat``'s storage."""
    group = optimizer.param_groups[flat.key.group]["params"]
    if len(group) <= max(flat.param_indices, default=-1):
        return False
    try:
        tensor_keys, scalar_keys = _state_roles(optimizer, flat.params)
    except CaptureError:
        return False
    expected = {role for role in flat.homes if role != PARAM}
    if expected != {Role("state", k) for k in tensor_keys} | {Role("scalar", k) for k in scalar_keys}:
        return False
    for j, (i, p) in enumerate(zip(flat.param_indices, flat.params, strict=True)):
        if group[i] is not p or dtensors.local(p).data_ptr() != flat.homes[PARAM][j].data_ptr():
            return False
    return {id(value) for _, _, value in _states_elsewhere(flat, optimizer)} == flat.left_elsewhere


def _states_elsewhere(flat: FlatGroup, optimizer: torch.optim.Optimizer) -> Iterator[tuple[Role, int, torch.Tensor]]:
    """Each (role, member position, tensor) of a member's state that does not live at its home in ``flat``."""
    for role, homes in flat.homes.items():
        if role == PARAM:
            continue
        for j, p in enumerate(flat.params):
            value = optimizer.state.get(p, {}).get(role.key)
            if isinstance(value, torch.Tensor) and (dtensors.local(value).data_ptr() != homes[j].data_ptr()
                                                    or dtensors.local(value).stride() != homes[j].stride()):
                yield role, j, value


def _flat_buffer(numel: int, key: BucketKey, slots: Sequence[tuple[int, int]],
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A flat buffer of one role of a bucket, at a stable address, with zeros between the ``slots`` ((offset,
    numel) of each member, in order): what the slots will hold is written by the caller. Allocated, not written,
    so that on CPU no page is backed before its slot is filled."""
    flat = torch.empty(numel, dtype=dtype or key.dtype, device=key.device)
    setattr(flat, FLAT_STORAGE, True)
    end = 0
    with torch.no_grad():
        for offset, size in [*slots, (numel, 0)]:
            if offset > end:
                flat[end:offset].zero_()
            end = max(end, offset + size)
    _compat.mark_static(flat)
    return flat


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _state_roles(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> tuple[list[str], list[str]]:
    tensor_keys: dict[str, None] = {}
    scalar_keys: dict[str, None] = {}
    per_element = per_element_state_keys(optimizer)
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                (tensor_keys if is_per_element_state(p, key, value, per_element) else scalar_keys)[key] = None
    both = tensor_keys.keys() & scalar_keys.keys()
    if both:
        raise CaptureError(f"state {sorted(both)} holds one number for some params and a tensor of the param's "
                           "shape for others: neither one flat tensor nor one vector of numbers holds it")
    return list(tensor_keys), list(scalar_keys)


def _move_into_flat(tensors: Sequence[torch.Tensor | None], shapes: Sequence[torch.Size],
                    strides: Sequence[Stride | None], offsets: Sequence[int], total: int, key: BucketKey,
                    staged_on_host: bool | None = None, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat buffer holding ``tensors`` (None: a member without this state; its slot is zeros), each re-homed
    into its slot: the same tensor object, now using a storage of its own size inside the buffer.

    Peak memory is the role once plus one tensor, not twice the role: on CPU each old tensor is released right
    after its copy (the buffer is allocated unwritten: a page is backed when its slot is filled); on an
    accelerator every tensor is first copied to host memory and released, so the buffer reuses their memory.
    Old storage is released only where nothing else holds it (a view kept by the user keeps its storage).
    ``staged_on_host``: whether to stage (default: on accelerators).
    """
    slots = [(offset, math.prod(shape)) for offset, shape in zip(offsets, shapes, strict=True)]
    staged: list[torch.Tensor | None] = []
    # Where each tensor's elements are (a DTensor's local shard): that tensor object moves.
    tensors = [None if tensor is None else dtensors.local(tensor) for tensor in tensors]
    # Each tensor keeps its exact strides (taken before staging empties it); a slot without one, its param's.
    strides = [stride if tensor is None else own_stride(tensor) for tensor, stride in zip(tensors, strides,
                                                                                       strict=True)]
    if key.device.type != "cpu" if staged_on_host is None else staged_on_host:
        try:
            for tensor in tensors:
                staged.append(None if tensor is None else tensor.detach().to("cpu", copy=True))
                if tensor is not None:
                    tensor.data = tensor.new_empty(0)  # released, unless something else holds the storage
            flat = _flat_buffer(total, key, slots, dtype)
        except BaseException:
            with torch.no_grad():
                for tensor, copy in zip(tensors, staged, strict=False):
                    if tensor is not None and copy is not None:
                        tensor.data = copy.to(key.device)
            raise
    else:
        flat = _flat_buffer(total, key, slots, dtype)
    homes = []
    with torch.no_grad():
        for j, (tensor, shape, stride, (offset, numel)) in enumerate(zip(tensors, shapes, strides, slots,
                                                                          strict=True)):
            home = alias(flat, offset, shape, stride)
            source = staged[j] if staged else tensor
            if source is None:
                flat[offset:offset + numel].zero_()
            else:
                home.copy_(source)
            if tensor is not None:
                tensor.data = home
            if staged:
                staged[j] = None  # host memory too is released as the buffer fills
            homes.append(home)
    for tensor, home in zip(tensors, homes, strict=True):
        # A tensor homed here shares its slot's storage with optcapture's own tensors (the slot, its base) by
        # design; the storage's Python object lives as long as the storage, so the count reaches the tensor later.
        setattr(home.untyped_storage(), HOME_STORAGE, _compat.storage_holders(home) - (tensor is not None))
    return flat, homes


def _build_flat_group(optimizer: torch.optim.Optimizer, key: BucketKey, align: int) -> FlatGroup:
    group = optimizer.param_groups[key.group]["params"]
    shards = dtensors.fsdp_shards(group)
    indices = [i for i, p in enumerate(group)
               if p.device == key.device and p.dtype == key.dtype and bucketable(p, shards)]
    # Params of one shape lie next to each other, at one stride: a lane-local update (LAMB, Muon) views them as one
    # [k, *shape] batch (optcapture.lane_batches). Elementwise runs do not care about the order.
    kind_of_shape: dict[torch.Size, int] = {}
    for i in indices:
        kind_of_shape.setdefault(group[i].shape, len(kind_of_shape))
    indices.sort(key=lambda i: kind_of_shape[group[i].shape])
    params = [group[i] for i in indices]
    fsdp = {id(p): shards[id(p)] for p in params if id(p) in shards}
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += _round_up(dtensors.footprint(p, fsdp), align)
    shapes = [dtensors.local_shape(p) for p in params]
    strides = [own_stride(dtensors.local(p)) for p in params]
    tensor_keys, scalar_keys = _state_roles(optimizer, params)
    flats: dict[Role, torch.Tensor] = {}
    homes: dict[Role, list[torch.Tensor]] = {}
    role_dtypes = _state_dtypes(optimizer, params, tensor_keys, key.dtype)
    for role in [PARAM, *(Role("state", k) for k in tensor_keys)]:
        role_dtype = role_dtypes.get(role)
        members: list[torch.Tensor | None] = []
        for p in params:
            tensor = p if role == PARAM else optimizer.state.get(p, {}).get(role.key)
            # Only a tensor of its param's shape, device and layout and of the role's dtype: copying another into
            # the slot would change the user's state (a float32 slot made timm's AdafactorBigVision's bfloat16
            # exp_avg float32), and a slot holds its elements in its param's order.
            members.append(tensor if isinstance(tensor, torch.Tensor) and _like_param(tensor, p, role_dtype) else None)
        flats[role], homes[role] = _move_into_flat(members, shapes, strides, offsets, total, key, dtype=role_dtype)
    for j, p in enumerate(params):
        shard = fsdp.get(id(p))
        if shard is not None:
            # FSDP2 all-gathers from its padded shard: it now views the slot, whose padding is zeros.
            dtensors.share_with_fsdp(shard, alias(flats[PARAM], offsets[j], torch.Size([shard.padded_numel])))
    scalars: dict[str, torch.Tensor] = {}
    for k in scalar_keys:
        sample = next(optimizer.state[p][k] for p in params if k in optimizer.state.get(p, {}))
        # On the param's device even where eager kept step counters on the CPU (as Dynamo's move_step_if_cpu does).
        vector = torch.zeros(len(params), dtype=sample.dtype, device=key.device)
        _compat.mark_static(vector)
        scalars[k] = vector
        role = Role("scalar", k)
        homes[role] = []
        for j, p in enumerate(params):
            value = optimizer.state.get(p, {}).get(k)
            # Of the user's own shape: ``()`` for a step counter, ``(1,)`` where the optimizer keeps one.
            home = alias(vector, j, value.shape if isinstance(value, torch.Tensor) else torch.Size([]))
            if isinstance(value, torch.Tensor):
                with torch.no_grad():
                    home.copy_(value)
                    value.data = home
            homes[role].append(home)
    log.info("flat storage for group %d on %s/%s: %d tensors, %d elements (%d with each tensor's slot aligned), "
             "state keys %s, scalar keys %s", key.group, key.device, key.dtype, len(params),
             sum(math.prod(shape) for shape in shapes), total, tensor_keys, scalar_keys)
    return FlatGroup(key, params, indices, offsets, shapes, strides, total, flats, scalars, homes)


def _state_dtypes(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], keys: Sequence[str],
                  param_dtype: torch.dtype) -> dict[Role, torch.dtype]:
    """The state keys whose tensors all have one floating dtype other than their params' (a bfloat16 momentum
    beside float32 params): flat storage of that key holds that dtype."""
    dtypes: dict[Role, torch.dtype] = {}
    for k in keys:
        seen = {value.dtype for p in params if isinstance(value := optimizer.state.get(p, {}).get(k), torch.Tensor)}
        if len(seen) == 1:
            (dtype,) = seen
            if dtype != param_dtype and dtype.is_floating_point:
                dtypes[Role("state", k)] = dtype
    return dtypes


def _like_param(tensor: torch.Tensor, p: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """``tensor`` can live in ``p``'s slot of another role as it is: same shape, device, element order, and the
    role's dtype (its param's unless :func:`_state_dtypes` gives the role another)."""
    return (tensor.shape == p.shape and tensor.dtype == (dtype or p.dtype) and tensor.device == p.device
            and same_order(dtensors.local(tensor), dtensors.local(p))
            and dtensors.differs_because(p, tensor, "state") is None)


def prepare(step: StepGraph, prepared: PreparedOptimizer) -> dict[BucketKey, FlatGroup]:
    """Re-home the tensors of every bucket of ``step`` into flat storage (reusing what exists). Raises
    :class:`CaptureError` when a member's state of a key flat storage holds is not in it (another shape, device or
    element order than its param's, or another dtype than its slot's): its slot holds zeros, which a bucketed step
    would read in its place."""
    flats = {bucket.key: prepared.flat_group(bucket.key) for bucket in step.buckets}
    optimizer = prepared.optimizer_ref()
    assert optimizer is not None
    for flat in flats.values():
        elsewhere = next(_states_elsewhere(flat, optimizer), None)
        if elsewhere is not None:
            role, j, value = elsewhere
            local, param = dtensors.local(value), dtensors.local(flat.params[j])
            slot_dtype = flat.flats[role].dtype  # the param's, or the one other dtype of all the key's tensors
            layout = ("" if local.shape != param.shape or local.dtype != slot_dtype or same_order(local, param) else
                      f", strides {tuple(local.stride())} against its param's {tuple(param.stride())}: another element "
                      "order")
            slot = (f"its param's {tuple(flat.shapes[j])} {slot_dtype}" if slot_dtype == flat.params[j].dtype else
                    f"its slot's {tuple(flat.shapes[j])} {slot_dtype}, the dtype of the key's other tensors")
            raise CaptureError(f"state {role.key!r} of param {flat.param_indices[j]} of group {flat.key.group} is not "
                               f"in flat storage (shape {tuple(value.shape)} {value.dtype}, {slot}{layout})")
    return flats
