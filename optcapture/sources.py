"""Dynamo's source names of param-group entries: the one parser of that name format.

Dynamo names what a step reads by its path from the frame (``L['self'].param_groups[0]['lr']``); discovery,
the backend (guards to drop, floats to read as inputs) and the lane modules all ask which param-group entry a name
reads, and discovery which entry of a param's state (``L['self'].state[list(dict.keys(L['self'].state))[0]]['step']``).
Invariant: only this module parses those names.
"""

from __future__ import annotations

import dataclasses
import re

# How Dynamo names a param-group entry it reads: ``L['self'].param_groups[0]['lr']``, ``...['betas'][1]``, or a name
# built on one (``type(L['self'].param_groups[0]['lr'])``, in a guard).
_HYPER_SOURCE = re.compile(r"param_groups\[(\d+)\]\['(\w+)'\](?:\[(\d+)\])?")


@dataclasses.dataclass(frozen=True)
class HyperSource:
    """The param-group entry a Dynamo source name reads (:func:`hyper_source`)."""

    group: int
    key: str
    index: int | None  # the item of a tuple entry (``betas[1]``)
    whole: bool  # the name is the entry itself, not a value reached through it (its type, an attribute)

    @property
    def role_key(self) -> str:
        """The key as :class:`InputRole` and the lanes name it: ``lr``, ``betas[1]``."""
        return self.key if self.index is None else f"{self.key}[{self.index}]"


def hyper_source(name: str) -> HyperSource | None:
    """The param-group entry that the source ``name`` reads, or None: the one parser of that name format."""
    match = _HYPER_SOURCE.search(name)
    if match is None:
        return None
    index = None if match.group(3) is None else int(match.group(3))
    return HyperSource(int(match.group(1)), match.group(2), index, match.end() == len(name))


def is_hyper_source(source: str, keys: set[tuple[int, str]]) -> bool:
    """Whether the Dynamo source name ``source`` reads one of the param-group entries ``keys`` (its guards go)."""
    hyper = hyper_source(source)
    return hyper is not None and (hyper.group, hyper.key) in keys


# How Dynamo names an entry of a param's state: the state dict's i-th key (``ConstDictKeySource``,
# torch/_dynamo/source.py), then the entry under it (``DictGetItemSource``).
_MEMBER_SOURCE = re.compile(r"^(?P<owner>.+)\.state\[list\(dict\.keys\((?P=owner)\.state\)\)\[(?P<position>\d+)\]\]"
                            r"\['(?P<key>\w+)'\]$")


@dataclasses.dataclass(frozen=True)
class MemberSource:
    """The entry of one param's state a Dynamo source name reads (:func:`member_source`)."""

    owner: str
    """The source of the object whose ``state`` it is (``L['self']``)."""
    position: int
    """The param's position among the keys of ``owner.state``, in the dict's order when the step was traced."""
    key: str


def member_source(name: str) -> MemberSource | None:
    """The entry of a param's state (``owner.state[p][key]``) that the source ``name`` is, or None."""
    match = _MEMBER_SOURCE.match(name)
    if match is None:
        return None
    return MemberSource(match.group("owner"), int(match.group("position")), match.group("key"))
