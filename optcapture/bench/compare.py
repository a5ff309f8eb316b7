"""``optcapture.bench.compare``: time your own model's optimizer step with every method, as the presets do, and
``--model pkg.module:factory`` on the command line.

Invariant: the model, params and optimizer passed in are never stepped or changed: every method gets its own deep
copy of them, all made from the same initial values.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optcapture.bench import methods as bench_methods
from optcapture.bench import report
from optcapture.bench.measure import compare_steps, release
from optcapture.bench.results import Result

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
"""Takes the model (or the list of params) it is given, a copy per method, and returns an optimizer over it."""


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` measured: one :class:`~optcapture.bench.results.Result` per method."""

    results: list[Result]
    header: dict[str, Any]

    def table(self) -> str:
        """The markdown table ``python -m optcapture.bench`` prints."""
        return report.markdown(self.results, self.header)

    def __str__(self) -> str:
        return self.table()

    @property
    def ok(self) -> bool:
        """Every method's params agree with eager's."""
        return all(r.matches is not False for r in self.results)

    def write(self, out: Path) -> None:
        """``results.json``, ``results.md`` and ``chart.png`` in ``out``."""
        report.write(out, self.results, self.header, self.table())


def default_optimizer(subject: nn.Module | Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW(lr=1e-3, weight_decay=0.01) over the trainable params."""
    return bench_methods.make_optimizer("adamw", trainable(subject))


def trainable(subject: nn.Module | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = subject.parameters() if isinstance(subject, nn.Module) else subject
    return [p for p in params if p.requires_grad]


def compare(model_or_params: nn.Module | Iterable[torch.Tensor],
            optimizer_factory: OptimizerFactory | torch.optim.Optimizer | None = None, *,
            methods: Sequence[str] | None = None, blocks: int = 5, steps: int = 20, label: str = "model",
            isolated: bool = False) -> Comparison:
    """Time the optimizer step of ``model_or_params`` with eager, ``fused=True``, stock ``torch.compile`` and
    optcapture, each on its own copy, in alternating blocks of ``steps`` steps; check every method against eager.

    ``optimizer_factory``: a function that takes the model (or the params list) and returns its optimizer, e.g.
    ``lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4)``; or an optimizer already built over
    ``model_or_params`` that has not stepped (copied with it for every method). Default AdamW(lr=1e-3,
    weight_decay=0.01). Params without ``.grad`` get the same random grads (seeded) in every method; the model
    stays on its device. ``fused`` runs where the optimizer class takes ``fused=True``; stock compile gets a tensor
    lr for ``torch.optim`` classes (PyTorch's recipe). ``isolated=True`` builds and times one method at a time
    (when copies of all do not fit in memory). Print the returned :class:`Comparison` for the table.
    """
    subject: nn.Module | list[torch.Tensor] = (model_or_params if isinstance(model_or_params, nn.Module)
                                               else list(model_or_params))
    originals = trainable(subject)
    if not originals:
        raise ValueError("compare: no params that require grad")
    device = originals[0].device
    grads = _grads_for(originals)
    factory = optimizer_factory or default_optimizer

    built_names: list[str] = []

    def make_copy() -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        if isinstance(factory, torch.optim.Optimizer):
            # One deepcopy of both: the copied optimizer's groups hold the copied model's params.
            copied, optimizer = copy.deepcopy((subject, factory))
        else:
            copied = copy.deepcopy(subject)
            optimizer = factory(copied)
        for p in trainable(copied):
            p.grad = None
        built_names.append(type(optimizer).__name__)
        return trainable(copied), optimizer

    chosen = list(methods or bench_methods.METHODS)
    unknown = sorted(set(chosen) - set(bench_methods.VARIANTS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(bench_methods.VARIANTS)}")
    notes: list[str] = []
    results = compare_steps(label, make_copy, grads, chosen, device, blocks, steps, isolated=isolated, notes=notes)
    release(device)
    header = report.header(built_names[0] if built_names else "?", device, blocks=blocks, steps=steps)
    header["notes"] = notes
    return Comparison(results, header)


def _grads_for(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The params' own grads where they have one, else seeded normal values of scale 1e-2."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    grads = []
    for p in params:
        if p.grad is not None:
            grads.append(p.grad.detach().clone())
        else:
            grads.append((torch.randn(p.shape, generator=generator) * 1e-2).to(device=p.device, dtype=p.dtype))
    return grads


def load_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:function`` (the function may be a dotted attribute path) → the function."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model takes pkg.module:factory, got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


def from_factory(spec: str, device: torch.device, optimizer_name: str | None, **options: Any) -> Comparison:
    """Run :func:`compare` on what ``spec``'s function returns: a model, a (model, optimizer) pair, or params.

    The model moves to ``device`` first (its optimizer, if any, keeps pointing at the same params); without an
    optimizer of its own, ``optimizer_name`` builds one (default AdamW).
    """
    made = load_factory(spec)()
    optimizer: torch.optim.Optimizer | None = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], torch.optim.Optimizer):
        made, optimizer = made
    if isinstance(made, nn.Module):
        made.to(device)
    elif optimizer is None:
        made = [torch.nn.Parameter(p.detach().to(device)) for p in made]
    factory: OptimizerFactory | torch.optim.Optimizer | None = optimizer
    if optimizer is None and optimizer_name is not None:
        def factory(subject: Any) -> torch.optim.Optimizer:
            return bench_methods.make_optimizer(optimizer_name, trainable(subject))
    return compare(made, factory, label=spec.rpartition(":")[2], **options)
