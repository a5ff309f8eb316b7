"""What the backend changes in the guards Dynamo collected for the frame it compiles (see :mod:`optcapture._compat`).

Called from the backend, i.e. before Dynamo turns ``tracer.output.guards`` into the guard function that runs at
every call of the compiled frame (torch/_dynamo/output_graph.py builds the CheckFunctionManager after the backend
returns; torch 2.11 and 2.13).

Invariant: a guard is either removed (only on hyperparameters whose changes the capture follows itself, through
device tensors, or that never reach compiled code, in a step run eagerly) or kept with the very check Dynamo would
have run, answered first by an identity test that can only say "same" when that check would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from optcapture._compat.distributed import dtensor_class


def drop_guards(tracer: Any, should_drop: Callable[[str], bool]) -> list[str]:
    """Remove the guards whose source name satisfies ``should_drop`` from the frame being compiled.

    Returns the names of the sources whose guards were removed. One pass over the guard set
    (``GuardsSet.remove_guards_with_source`` rebuilds it once per source).
    """
    from optcapture._compat import source_name

    guards = tracer.output.guards
    keep, dropped = [], set()
    for guard in guards.inner:
        name = source_name(guard.originating_source)
        if should_drop(name):
            dropped.add(name)
        else:
            keep.append(guard)
    if dropped:
        _replace_guards(guards, keep)
    return sorted(dropped)


# The guards Dynamo puts on a DTensor compare its metadata in Python at every call, a few microseconds each: on
# torch 2.13 DTENSOR_SPEC_MATCH on ``<t>._spec`` (DTensorSpec._check_equals, which compares the device meshes
# field by field) and OPAQUE_OBJ_GUARD_FN_MATCH on ``<t>.device_mesh`` (five fields of the mesh); on torch 2.11
# TENSOR_SUBCLASS_METADATA_MATCH on ``<t>`` (``__tensor_flatten__`` and the spec's ``__eq__``). FSDP2 assigns a new
# grad DTensor at every step, but one that holds its param's own spec object (``FSDPParam.to_sharded_dtensor``
# wraps the reduce-scattered shard with ``self._sharding_spec``), so over 148 GPT-2 grads these checks were most
# of a step's host time. Meshes and specs are not changed in place once made (DTensorSpec caches its hash).
_METADATA_GUARDS = frozenset({"DTENSOR_SPEC_MATCH", "OPAQUE_OBJ_GUARD_FN_MATCH", "TENSOR_SUBCLASS_METADATA_MATCH"})


def identity_first_guards(tracer: Any) -> int:
    """Have every DTensor metadata guard of the frame being compiled first test whether the value it reads is the
    very object it was built from (a DTensor's spec, a device mesh) and run its own comparison only when not.
    Returns how many guards were changed."""
    guards = tracer.output.guards
    changed = 0
    rebuilt = []
    for guard in guards.inner:
        create = guard.inner_create_fn()
        if getattr(create, "__name__", None) in _METADATA_GUARDS and not isinstance(guard.create_fn,
                                                                                     functools.partial):
            # Unserializable: Dynamo's guard serialization (precompile) knows its own create functions only.
            guard = dataclasses.replace(guard, create_fn=_identity_first(create), _hash=None, _unserializable=True)
            changed += 1
        rebuilt.append(guard)
    if changed:
        _replace_guards(guards, rebuilt)
    return changed


def _replace_guards(guards: Any, kept: list[Any]) -> None:
    guards.inner = type(guards.inner)(kept)
    if hasattr(guards, "source_to_guards"):
        guards.source_to_guards.clear()
        for guard in kept:
            guards.track_guard_by_source(guard)


def _identity_first(create: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    @functools.wraps(create)
    def create_identity_first(builder: Any, guard: Any) -> None:
        create(_Builder(builder), guard)

    return create_identity_first


class _Builder:
    """Dynamo's GuardBuilder as a metadata guard's create function sees it: it remembers the value the guard reads
    (``builder.get``) and hands out guard managers whose ``add_lambda_guard`` puts the identity test first."""

    def __init__(self, builder: Any) -> None:
        self._builder = builder
        self.value: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._builder, name)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self.value = self._builder.get(*args, **kwargs)
        return self.value

    def get_guard_manager(self, guard: Any) -> _Manager:
        return _Manager(self._builder.get_guard_manager(guard), self)


class _Manager:
    def __init__(self, manager: Any, builder: _Builder) -> None:
        self._manager = manager
        self._builder = builder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def add_lambda_guard(self, check: Callable[[Any], bool], *rest: Any) -> None:
        value, self._builder.value = self._builder.value, None
        self._manager.add_lambda_guard(_same_object_or(value, check), *rest)


def _same_object_or(value: Any, check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``check``, answered True first when the guarded value is ``value``'s own metadata object again."""
    dtensor = dtensor_class()
    if dtensor is None:
        return check
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    if type(value) is dtensor:
        held: Any = value
        # Its flattened metadata is (spec, requires_grad); never hold the tensor itself (a grad's memory).
        spec, requires_grad = held._spec, held.requires_grad

        def same_spec(x: Any) -> bool:
            return (type(x) is dtensor and x._spec is spec and x.requires_grad is requires_grad) or check(x)

        return same_spec
    if type(value) in (DTensorSpec, DeviceMesh):

        def same_object(x: Any) -> bool:
            return x is value or check(x)

        return same_object
    return check


__all__ = ["drop_guards", "identity_first_guards"]
