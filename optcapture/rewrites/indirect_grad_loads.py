"""Rewrite: a bucket kernel reads each grad where autograd left it, through a table of addresses.

The bucketed step is traced over a *virtual* flat grad: a tensor of the run's length whose memory is only a
small descriptor (see :class:`optcapture.grad_tables.GradTable`). Every Triton load of it,
``tmp = tl.load(in_ptrK + (x0), xmask)``, becomes three loads from the descriptor (member of this chunk,
that member's grad address, its end) and one load from the grad itself, masked to the member's elements.
So a CUDA graph replays with no grad copy even when ``zero_grad()`` left autograd to allocate new grads.

Invariant: a compile is only used when :meth:`IndirectGradLoads.verify` finds that every read of every
virtual grad, in every kernel and in the wrapper, was rewritten; otherwise the caller falls back to copying
grads into real flat storage. A virtual grad's own elements are never read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch

from optcapture._compat import KernelInputs

MARKER = "_optcapture_grad"
_TRITON_TYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
                 torch.float64: "tl.float64"}
_LOAD = re.compile(r"^(?P<indent>\s*)(?P<var>\w+) = tl\.load\((?P<ptr>\w+) \+ \((?P<index>[^()]*)\), "
                   r"(?P<mask>\w+)(?:, \w+='?[\w.]+'?)*\)(?P<cast>\.to\([\w.]+\))?$")
_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)'''", re.DOTALL | re.MULTILINE)
_ALLOWED_WRAPPER_LINE = re.compile(r"^\s*(?:[\w, ]+ = args|partition\d+_args = \[[\w, ]*\]|del [\w, ]+|"
                                   r"assert_size_stride\(\w+, .*\)|assert_alignment\(\w+, .*\))$")
_RUN = re.compile(r"^\s*(\w+)\.run\(")


def triton_type(dtype: torch.dtype) -> str | None:
    return _TRITON_TYPES.get(dtype)


@dataclasses.dataclass(frozen=True)
class IndirectGrad:
    """Where one virtual grad sits among the compiled graph's inputs and how its descriptor is laid out."""

    pointer: int  # the virtual grad's data pointer (its descriptor's), which names it among the graph inputs
    dtype: torch.dtype
    chunk: int  # elements per entry of the descriptor's int32 chunk -> member table (at its start)
    addresses_at: int  # int64 index of the first member's address (minus its offset) in the descriptor
    limits_at: int  # int64 index of the first member's end (exclusive, in run elements)


class IndirectGradLoads:
    """The rewrite, applied to each generated kernel; collects what it could not rewrite."""

    def __init__(self, grads: Sequence[IndirectGrad]) -> None:
        self.grads = list(grads)
        self.failures: list[str] = []
        self.rewritten_loads = 0

    def __call__(self, inputs: KernelInputs, source: str) -> str:
        targets = {name: grad for grad in self.grads if (name := inputs(grad.pointer)) is not None}
        if not targets:
            return source
        lines = source.split("\n")
        out: list[str] = []
        for line in lines:
            match = _LOAD.match(line)
            grad = targets.get(match.group("ptr")) if match else None
            if match is None or grad is None:
                out.append(line)
                continue
            out.extend(self._indirect(match, grad))
        rewritten = "\n".join(out)
        for name in targets:
            leftovers = [line for line in out if re.search(rf"\b{name}\b(?!\.to\()", line)
                         and not line.lstrip().startswith("def ") and "'signature'" not in line
                         and "mutated_arg_names" not in line]
            if leftovers:
                self.failures.append(f"{name} used as {leftovers[0].strip()!r}")
        return rewritten

    def _indirect(self, match: re.Match[str], grad: IndirectGrad) -> list[str]:
        self.rewritten_loads += 1
        indent, var, ptr = match.group("indent"), match.group("var"), match.group("ptr")
        index, mask = f"({match.group('index')})", match.group("mask")
        element = triton_type(grad.dtype)
        name = f"{var}{MARKER}"
        inner_mask = "" if mask == "None" else f", {mask}, other=0"
        in_member = f"{index} < {name}_limit" if mask == "None" else f"{mask} & ({index} < {name}_limit)"
        return [
            f"{indent}{name}_member = tl.load({ptr}.to(tl.pointer_type(tl.int32)) + {index} // {grad.chunk}"
            f"{inner_mask})",
            f"{indent}{name}_base = tl.load({ptr}.to(tl.pointer_type(tl.int64)) + {grad.addresses_at} + "
            f"{name}_member{inner_mask})",
            f"{indent}{name}_limit = tl.load({ptr}.to(tl.pointer_type(tl.int64)) + {grad.limits_at} + "
            f"{name}_member{inner_mask})",
            f"{indent}{var} = tl.load({name}_base.to(tl.pointer_type({element})) + {index}, {in_member}, other=0.0)"
            f"{match.group('cast') or ''}",
        ]

    def verify(self, wrapper_sources: Sequence[str], input_names: Mapping[int, str]) -> str | None:
        """None when every read of a virtual grad was rewritten; else what was not.

        ``input_names``: Inductor's name of each graph input, by data pointer.
        """
        if self.failures:
            return f"a kernel reads a grad in a way optcapture does not rewrite ({self.failures[0]})"
        if self.rewritten_loads == 0:
            return "no kernel load of a grad was found to rewrite"
        wrappers = [s for s in wrapper_sources if "def call(" in s]
        if not wrappers:
            return "Inductor's wrapper code was not found"
        for source in wrappers:
            # What follows the entry point only builds random example inputs for benchmarking it.
            source = re.split(r"\ndef (?:get_args|benchmark_compiled_module)\(", source)[0]
            kernels = dict(_KERNEL.findall(source))
            for grad in self.grads:
                name = input_names.get(grad.pointer)
                if name is None:
                    return "a grad is not among the compiled graph's inputs"
                for line in source.split("\n"):
                    if line.lstrip().startswith("#") or not re.search(rf"\b{name}\b", line) \
                            or _ALLOWED_WRAPPER_LINE.match(line):
                        continue
                    run = _RUN.match(line)
                    if run is None or MARKER not in kernels.get(run.group(1), ""):
                        return f"the grad input {name} is read outside a rewritten kernel: {line.strip()!r}"
        return None

