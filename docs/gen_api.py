"""Generates docs/api.md: optcapture's API reference, from its docstrings, and its compatibility table.

    python docs/gen_api.py             # rewrite docs/api.md (the CPU paths come from docs/compat-cpu.json)
    python docs/gen_api.py --measure   # first re-measure the CPU path of every stock optimizer (minutes)
    python docs/gen_api.py --check     # exit 1 if docs/api.md differs from what would be generated

Invariant: docs/api.md is a pure function of the installed optcapture's docstrings and signatures, PyTorch's
``optim_db`` case list (what ``tests/gpu`` runs) and docs/compat-cpu.json (measured); every name in
``optcapture.__all__``, every option and every field of ``CaptureReport`` and ``Stats`` is documented, or
generating fails. No dependency beyond the standard library and torch.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import typing
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"
COMPAT_JSON = ROOT / "docs" / "compat-cpu.json"
REGENERATE = "python docs/gen_api.py"
STEPS = 3
EAGER_RAISES = "eager torch.optim raises too: "

sys.path.insert(0, str(ROOT))
import optcapture  # noqa: E402

# ---------------------------------------------------------------------------------------------- docstrings


def markdown(doc: str) -> str:
    """A docstring (reStructuredText roles, ``literals``) as Markdown."""
    doc = re.sub(r":(?:class|func|meth|attr|data|mod|exc):`~?([\w.]+)`",
                 lambda m: f"`{m.group(1).rsplit('.', 1)[-1] if '~' in m.group(0) else m.group(1)}`", doc)
    return re.sub(r"``(.+?)``", r"`\1`", doc, flags=re.S)


def one_line(doc: str) -> str:
    return " ".join(markdown(doc).split()).replace("|", "\\|")


def attribute_docs(owner: type | Any) -> dict[str, str]:
    """The docstrings written under the attributes of a class or module (``x: int = 0`` then ``\"\"\"...\"\"\"``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
    body = tree.body[0].body if isinstance(owner, type) else tree.body  # type: ignore[attr-defined]
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        target = statement.target if isinstance(statement, ast.AnnAssign) else (
            statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else None)
        if (isinstance(target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[target.id] = inspect.cleandoc(following.value.value)
    return docs


_MODULE_PATH = re.compile(r"\b(?:[a-z_]\w*\.)+(\w+)")


def source_value(module: Any, name: str) -> Any:
    """The value a module's source assigns to ``name`` (not the value now: tests may have changed it)."""
    for statement in ast.parse(inspect.getsource(module)).body:
        if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == [name]:
            return ast.literal_eval(statement.value)
    raise SystemExit(f"{module.__name__}.{name} is not assigned a literal")


def type_name(hint: Any) -> str:
    """An annotation (or a signature) without module paths: ``tuple[InputRole, ...]``."""
    text = str(hint) if isinstance(hint, inspect.Signature) else inspect.formatannotation(hint)
    return _MODULE_PATH.sub(r"\1", text).replace("~", "")  # "~T": a TypeVar


def fields_table(cls: type, with_defaults: bool) -> list[str]:
    docs, hints = attribute_docs(cls), typing.get_type_hints(cls)
    header = "| field | type | default | meaning |" if with_defaults else "| field | type | meaning |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for field in dataclasses.fields(cls):
        if field.name not in docs:
            raise SystemExit(f"{cls.__name__}.{field.name} has no docstring: document it under the field")
        default = f" `{field.default!r}` |" if with_defaults else ""
        lines.append(f"| `{field.name}` | `{type_name(hints[field.name])}` |{default} {one_line(docs[field.name])} |")
    return lines


def signature(name: str, obj: Any) -> str:
    return f"optcapture.{name}{type_name(inspect.signature(obj, eval_str=True))}"


def function_section(name: str) -> list[str]:
    obj = getattr(optcapture, name)
    return [f"### `{signature(name, obj)}`", "", markdown(inspect.getdoc(obj) or ""), ""]


def class_section(name: str, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    cls = getattr(optcapture, name)
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    lines = [f"### `optcapture.{name}`" + (f" ({', '.join(bases)})" if bases else ""), "",
             markdown(inspect.getdoc(cls) or ""), ""]
    if dataclasses.is_dataclass(cls):
        lines += fields_table(cls, with_defaults=name == "CaptureConfig") + [""]
    for member, value in vars(cls).items():
        if isinstance(value, property) or (inspect.isfunction(value) and not member.startswith("_")):
            doc = inspect.getdoc(value)
            if doc is None:
                raise SystemExit(f"{name}.{member} has no docstring")
            kind = "property" if isinstance(value, property) else (
                f"method `{member}{type_name(inspect.signature(value, eval_str=True))}`")
            lines += [f"- `{member}` ({kind}): {one_line(doc)}" if kind == "property" else f"- {kind}: {one_line(doc)}"]
    return lines + [""] + list(extra)


def reference() -> list[str]:
    from optcapture import config, progress

    sections = {
        "Entry points": [("function", "optcapture_backend"), ("function", "capture")],
        "Options": [("class", "CaptureConfig")],
        "Inspecting": [("function", "explain"), ("class", "CaptureReport"), ("function", "stats"), ("class", "Stats"),
                       ("function", "reset")],
        "Errors": [("class", "CaptureError"), ("class", "OptionError"), ("class", "UnsupportedStepError")],
    }
    documented = {name for members in sections.values() for _, name in members} | {"__version__"}
    if documented != set(optcapture.__all__):
        differ = sorted(documented ^ set(optcapture.__all__))
        raise SystemExit(f"optcapture.__all__ and docs/gen_api.py's sections disagree: {differ}")
    lines = ["## API", "", f"Everything in `optcapture.__all__` (version `{optcapture.__version__}`).", ""]
    mode = [f"`torch.compile(..., mode=...)`: {one_line(inspect.getdoc(config.parse_options) or '')}", ""]
    for title, members in sections.items():
        lines += [f"## {title}", ""]
        for kind, name in members:
            lines += function_section(name) if kind == "function" else class_section(
                name, mode if name == "CaptureConfig" else [])
    slow, threshold = "SLOW_FIRST_CALL_SECONDS", source_value(progress, "SLOW_FIRST_CALL_SECONDS")
    lines += ["## Logs and warnings", "", markdown(inspect.getdoc(progress) or "").split("\n\nInvariant")[0], "",
              f"`optcapture.progress.{slow} = {threshold}`: {one_line(attribute_docs(progress)[slow])}", ""]
    return lines


# ---------------------------------------------------------------------------------------------- compatibility

GPU_ELEMENTWISE = ("Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
                   "SGD")  # tests/gpu/test_cuda.py's ELEMENTWISE
GPU_DEFAULT_CASES = 4  # tests/gpu/test_cuda.py: _cuda_cases(first_n=4); the rest run under -m exhaustive


def stock_optimizers() -> list[type[torch.optim.Optimizer]]:
    found = {value for value in vars(torch.optim).values() if isinstance(value, type)
             and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer}
    return sorted(found, key=lambda c: c.__name__.lower())


def variants(cls: type[torch.optim.Optimizer]) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one optimizer: its defaults, then each important flag it takes, alone."""
    takes = inspect.signature(cls.__init__).parameters
    rows: list[tuple[str, dict[str, Any]]] = [("default", {})]
    flags = [("foreach", True), ("maximize", True), ("amsgrad", True), ("capturable", True), ("fused", True)]
    rows += [(f"{flag}={value}", {flag: value}) for flag, value in flags if flag in takes]
    extra = {"SGD": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}],
             "RMSprop": [{"momentum": 0.9}, {"centered": True}]}.get(cls.__name__, [])
    rows += [(", ".join(f"{k}={v}" for k, v in kwargs.items()), kwargs) for kwargs in extra]
    return rows


def _model(cls: type) -> torch.nn.Module:
    torch.manual_seed(0)
    bias = cls.__name__ != "Muon"  # Muon takes 2-D params only
    return torch.nn.Sequential(torch.nn.Linear(6, 6, bias=bias), torch.nn.Linear(6, 6, bias=bias))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def measure(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Step ``cls(**kwargs)`` eagerly and through optcapture on the same grads, on CPU: the paths taken, and how far
    apart the params end."""
    torch._dynamo.reset()
    optcapture.reset()
    eager_model = _model(cls)
    model = copy.deepcopy(eager_model)
    row: dict[str, Any] = {"optimizer": cls.__name__, "kwargs": kwargs, "paths": [], "captures": 0, "reason": "",
                           "error": "", "max_abs_diff": None}
    try:
        eager = cls(eager_model.parameters(), **kwargs)
        optimizer = cls(model.parameters(), **kwargs)
    except Exception as error:  # noqa: BLE001 - e.g. fused=True where torch has no such kernel
        row["error"] = f"torch refuses these options: {_first_line(error)}"
        return row
    step = torch.compile(optimizer.step, backend="optcapture")
    data = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def closure_of(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = net(data).square().sum()
            loss.backward()
            return loss
        return closure

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(STEPS):
            generator = torch.Generator().manual_seed(seed)
            for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
                grad = torch.randn(p.shape, generator=generator)
                if cls.__name__ == "SparseAdam":
                    grad = grad.to_sparse()
                p.grad, q.grad = grad.clone(), grad.clone()
            closure = cls.__name__ == "LBFGS"
            try:
                eager.step(closure_of(eager_model, eager)) if closure else eager.step()
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{EAGER_RAISES}{_first_line(error)}"
                return row
            try:
                step(closure_of(model, optimizer)) if closure else step()
            except Exception as error:  # noqa: BLE001
                row["error"] = _first_line(error)
                break
    reports = optcapture.explain(optimizer)
    row["paths"] = [r.path for r in reports]
    row["captures"] = optcapture.stats().captures
    reasons = [reason for r in reports for reason in r.reasons] + [  # fallbacks are RuntimeWarnings
        str(w.message) for w in caught if w.category is RuntimeWarning and str(w.message).startswith("optcapture:")]
    row["reason"] = reasons[0][:200] if reasons else ""
    if not row["error"]:
        row["max_abs_diff"] = max(float((p - q).abs().max()) for p, q in
                                  zip(eager_model.parameters(), model.parameters(), strict=True))
    return row


def measure_all() -> dict[str, Any]:
    rows = []
    for cls in stock_optimizers():
        for label, kwargs in variants(cls):
            print(f"measuring {cls.__name__} {label}", file=sys.stderr, flush=True)
            rows.append({"variant": label, **measure(cls, kwargs)})
    return {"torch": torch.__version__, "device": "cpu", "steps": STEPS, "rows": rows}


_DEVICE_LIST = re.compile(r" devices: \[.*")


def cpu_cell(row: dict[str, Any]) -> str:
    if row["error"].startswith(EAGER_RAISES):
        return f"n/a on CPU ({_DEVICE_LIST.sub(' devices', row['error'])})"
    if row["error"]:
        return f"error: {row['error']}"
    paths = list(dict.fromkeys(row["paths"]))
    if not paths:
        return ("not captured: no graph of its step reaches optcapture (`stats().captures` is 0)"
                if row["captures"] == 0 else "no report")
    text = " → ".join(paths)
    if paths[-1] != "bucketed" and row["reason"]:
        text += f" ({row['reason']})"
    return text


def gpu_cell(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> str:
    """What tests/gpu asserts for this row: its test_matches_eager_cuda runs optim_db's CUDA cases of the elementwise
    optimizers (but differentiable and fused) and asserts parity with eager, the bucketed path and one CUDA graph."""
    if cls.__name__ not in GPU_ELEMENTWISE or "fused" in kwargs:
        return "not tested on CUDA"
    from torch.testing._internal.common_optimizers import (
        _get_optim_inputs_including_global_cliquey_kwargs,
        optim_db,
    )

    (info,) = [info for info in optim_db if info.optim_cls is cls]
    cases = _get_optim_inputs_including_global_cliquey_kwargs("cuda", torch.float32, info,
                                                              skip=("differentiable", "fused"))
    for n, case in enumerate(cases):
        given = case.kwargs
        if all(key in given and not isinstance(given[key], torch.Tensor) and given[key] == value
               for key, value in kwargs.items()):
            where = "default suite" if n < GPU_DEFAULT_CASES else "`-m exhaustive`"
            return f"bucketed, 1 CUDA graph (asserted: case `{case.desc}`, {where})"
    return "not tested on CUDA"


def compatibility(measured: dict[str, Any]) -> list[str]:
    rows = measured["rows"]
    expected = [(cls.__name__, label) for cls in stock_optimizers() for label, _ in variants(cls)]
    if [(row["optimizer"], row["variant"]) for row in rows] != expected:
        raise SystemExit(f"docs/compat-cpu.json does not list this torch's optimizers and variants: run "
                         f"`{REGENERATE} --measure`")
    classes = {cls.__name__: cls for cls in stock_optimizers()}
    lines = [
        "## Compatibility", "",
        "| torch | device | what runs there |", "|---|---|---|",
        "| 2.13 | CPU | the CI suite (`.ci/run`: `python -m pytest`), and the CPU column below |",
        "| 2.11 | CPU | the CPU suite too (CHANGELOG: parity cases skip where Dynamo itself fails with its `eager` "
        "backend) |",
        "| 2.11 | CUDA (H100, H200) | `python -m pytest tests/gpu -m \"gpu and not exhaustive\"` (CHANGELOG: 59 "
        "passed on an H100) and the benchmarks in the README |", "",
        "### Stock optimizers", "",
        f"CPU: measured by `{REGENERATE} --measure` on torch {measured['torch']}: {measured['steps']} steps of a "
        "2 x Linear(6, 6) model with the same grads, eagerly and through `torch.compile(opt.step, "
        "backend=\"optcapture\")`; the paths `optcapture.explain(opt)` reports, in order (why, where the last is not "
        "`bucketed`), and the largest difference of the params from eager `torch.optim`. CUDA: not measured here; what "
        "`tests/gpu/test_cuda.py::test_matches_eager_cuda` asserts for the first case of PyTorch's `optim_db` (as "
        "this torch lists them) that has these options, maybe with others (parity with eager, the `bucketed` path, "
        "one CUDA graph recorded), else \"not tested on CUDA\". The CHANGELOG records a run of the default GPU "
        "suite on an H100 with torch 2.11 (59 passed), and none of its `-m exhaustive` cases.", "",
        "| optimizer | options | CPU path | CPU max \\|Δ\\| vs eager | CUDA |", "|---|---|---|---|---|"]
    for row in rows:
        diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        cpu = cpu_cell(row).replace("|", "\\|")
        lines.append(f"| {row['optimizer']} | {row['variant']} | {cpu} | {diff} | "
                     f"{gpu_cell(classes[row['optimizer']], row['kwargs'])} |")
    return lines + [""]


def generate(measured: dict[str, Any]) -> str:
    head = ["# optcapture API reference", "",
            f"<!-- Generated by `{REGENERATE}` from the docstrings and docs/compat-cpu.json; do not edit. -->", ""]
    return "\n".join(head + reference() + compatibility(measured)).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="re-measure docs/compat-cpu.json first (minutes)")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    if args.measure:
        COMPAT_JSON.write_text(json.dumps(measure_all(), indent=1) + "\n", encoding="utf-8")
    text = generate(json.loads(COMPAT_JSON.read_text(encoding="utf-8")))
    if args.check:
        stale = not API_MD.exists() or API_MD.read_text(encoding="utf-8") != text
        if stale:
            print(f"docs/api.md is stale: run `{REGENERATE}`", file=sys.stderr)
        return int(stale)
    API_MD.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
