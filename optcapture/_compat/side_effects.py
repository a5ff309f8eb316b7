"""Dynamo's record of what the frame being compiled writes back after its graph (``tracer.output.side_effects``):
attribute stores on optimizers and entries of dicts the frame changed.

Invariant: each helper only reads the tracer, and answers "nothing" (or False) where the record cannot be read.
"""

from __future__ import annotations

from typing import Any

import torch

from optcapture._compat import source_name


def frame_has_no_side_effects(tracer: Any) -> bool:
    """True when Dynamo replays no Python side effect after the graph of the frame being compiled
    (False when that cannot be told)."""
    try:
        return bool(tracer.output.side_effects.is_empty())
    except AttributeError:
        return False


NOT_CONSTANT = object()
"""An attribute store whose value Dynamo holds as a symbol or a tensor, not as a Python constant."""


def optimizer_attribute_stores(tracer: Any) -> list[tuple[Any, str, Any]]:
    """(optimizer, attribute, value) of each attribute assignment on a ``torch.optim.Optimizer`` that the frame
    being compiled made (``self._k += 1`` in a user's step). Dynamo records them but does not write them back
    after the graph, whatever the backend (torch 2.13: the attribute keeps its old value, so the guard on it
    keeps passing and every later step reuses the first step's value). The value is a Python constant, or
    :data:`NOT_CONSTANT`."""
    try:
        mutations = tracer.output.side_effects.store_attr_mutations
    except AttributeError:
        return []
    stores = []
    for variable, attributes in mutations.items():
        owner = getattr(variable, "value", None)
        if not isinstance(owner, torch.optim.Optimizer):
            continue
        for name, value in attributes.items():
            try:
                stores.append((owner, name, value.as_python_constant()))
            except Exception:  # noqa: BLE001 - NotImplementedError for symbols and tensors; any failure: not a constant
                stores.append((owner, name, NOT_CONSTANT))
    return stores


def dict_entry_stores(tracer: Any) -> list[tuple[int, Any, torch.fx.Node | None, str | None]]:
    """(id of the dict, key, node, source) of each entry a dict the frame being compiled changed now holds, where it
    no longer holds what it held: ``node`` for a tensor the graph computes (``state["m"] = state["m"] * beta +
    grad``), else ``source`` names where the new value was read (``state["prev"] = state["cur"]``: the other
    entry's source; None for a constant). Dynamo writes these entries back after the graph from its outputs
    (torch/_dynamo/side_effects.py, ``codegen_update_mutated``)."""
    try:
        side_effects = tracer.output.side_effects
        variables = list(side_effects.id_to_variable.items())
    except AttributeError:
        return []
    from torch._dynamo.source import DictGetItemSource
    from torch._dynamo.variables import ConstDictVariable, TensorVariable

    stores: list[tuple[int, Any, torch.fx.Node | None, str | None]] = []
    for object_id, variable in variables:
        if not isinstance(variable, ConstDictVariable) or not side_effects.is_modified(variable):
            continue
        for key_tracker, value in variable.items.items():
            try:
                key = key_tracker.vt.as_python_constant()
            except Exception:  # noqa: BLE001 - a key Dynamo cannot name as a constant: not a state key
                continue
            source = getattr(value, "source", None)
            if source is not None:
                own = DictGetItemSource(variable.source, key) if variable.source is not None else None
                if own is not None and source_name(source) == source_name(own):
                    continue  # the entry it held
                stores.append((object_id, key, None, source_name(source)))
            elif isinstance(value, TensorVariable):
                stores.append((object_id, key, value.as_proxy().node, None))
            else:
                stores.append((object_id, key, None, None))
    return stores
