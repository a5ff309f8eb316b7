"""Try third-party optimizers (timm, pytorch_optimizer) through a torch.compile backend, as a user would.

A helper module, not a test file (pytest does not collect it). Each optimizer steps an eager copy and a
``torch.compile(opt.step, backend=...)`` copy of the same small model on the same grads; params and the whole
optimizer state are then compared. From the command line every optimizer runs in its own subprocess (all the
backends of one optimizer in one process, optcapture first; a backend that crashes or times out gets an error
result and the next backend runs in a new process)::

    python tests/third_party.py --out .probe/survey.json                  # everything, optcapture + inductor
    python tests/third_party.py --only Lion --only timm.Adan --backends optcapture
    python tests/third_party.py --list                                    # what is found, kwargs, exclusions
    python tests/third_party.py --optcapture DIR --budget 2700 --out F    # optcapture from DIR; stop after 45 min
    python tests/third_party.py --one pytorch_optimizer.Lion --backend optcapture,inductor   # JSON lines

timm is loaded without importing ``timm`` itself (its ``__init__`` imports torchvision): see
:func:`timm_optimizers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

BACKENDS = ("optcapture", "inductor", "eager")
ATOL = RTOL = 1e-5
DEFAULT_LR = 1e-3
SUBPROCESS_TIMEOUT_S = 300
RESULT_PREFIX = "THIRD_PARTY_RESULT "

# --------------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------------

TIMM_SKIPPED_MODULES: dict[str, str] = {}
"""timm/optim modules :func:`timm_optimizers` did not import, with why (filled by each call)."""

_TIMM_NOT_OPTIMIZER_MODULES = {
    "optim_factory": "factory (imports _param_groups -> timm.models)",
}


def _timm_optim_dir() -> Path | None:
    # find_spec on a top-level package locates it without executing its __init__ (checked: "timm" stays out of
    # sys.modules); only the import of a submodule would run the parent package's __init__. A stub left by an
    # earlier call (no __spec__) already names the directory.
    stub = sys.modules.get("timm")
    if stub is not None and getattr(stub, "__spec__", None) is None and getattr(stub, "__path__", None):
        optim_dir = Path(list(stub.__path__)[0]) / "optim"
        return optim_dir if optim_dir.is_dir() else None
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    optim_dir = Path(list(spec.submodule_search_locations)[0]) / "optim"
    return optim_dir if optim_dir.is_dir() else None


def timm_optimizers() -> dict[str, type]:
    """timm's optimizer classes, ``{"timm.<ClassName>": cls}``, without importing ``timm`` (or torchvision).

    Stub package modules ``timm`` and ``timm.optim`` (``__path__`` set to the installed directories, no
    ``__init__`` executed) are placed in ``sys.modules`` so the relative imports inside ``timm/optim/*.py``
    resolve; each optimizer module is then imported on its own. The stubs and the imported modules are LEFT in
    ``sys.modules``: Dynamo imports a traced function's module by name (``timm.optim.lion``), and without the stubs
    that import would run the real ``timm/__init__.py`` (torchvision). Consequence: a later ``import timm`` in the
    same process gets the stub (use a subprocess for real timm). If a real ``timm`` is already imported, its
    submodules are imported normally. Modules that fail to import are listed in :data:`TIMM_SKIPPED_MODULES`.
    Importing ``timm.optim.kron`` sets ``torch._dynamo.config.cache_size_limit`` to 1e6; that side effect is undone
    here so that every optimizer is compiled under Dynamo's defaults.
    """
    TIMM_SKIPPED_MODULES.clear()
    optim_dir = _timm_optim_dir()
    if optim_dir is None:
        return {}
    real_timm = "timm" in sys.modules and getattr(sys.modules["timm"], "__file__", None) is not None
    recompile_limit = torch._dynamo.config.recompile_limit
    if not real_timm and "timm" not in sys.modules:
        for name, path in (("timm", optim_dir.parent), ("timm.optim", optim_dir)):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            stub.__package__ = name
            sys.modules[name] = stub
        sys.modules["timm"].optim = sys.modules["timm.optim"]  # type: ignore[attr-defined]
    found: dict[str, type] = {}
    try:
        for file in sorted(optim_dir.glob("*.py")):
            stem = file.stem
            if stem.startswith("_"):
                continue
            if stem in _TIMM_NOT_OPTIMIZER_MODULES:
                TIMM_SKIPPED_MODULES[stem] = _TIMM_NOT_OPTIMIZER_MODULES[stem]
                continue
            module_name = f"timm.optim.{stem}"
            try:
                module = importlib.import_module(module_name)
            except Exception as error:  # noqa: BLE001 - any import failure just skips the module
                TIMM_SKIPPED_MODULES[stem] = repr(error)
                continue
            for value in vars(module).values():
                if (isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
                        and value.__module__ == module_name):
                    found[f"timm.{value.__name__}"] = value
    finally:
        torch._dynamo.config.recompile_limit = recompile_limit
    return found


def pytorch_optimizer_optimizers() -> dict[str, type]:
    """pytorch_optimizer's registry, ``{"pytorch_optimizer.<ClassName>": cls}`` (each class once)."""
    try:
        import pytorch_optimizer
    except ImportError:
        return {}
    found: dict[str, type] = {}
    for registered in pytorch_optimizer.get_supported_optimizers():
        cls = pytorch_optimizer.load_optimizer(registered) if isinstance(registered, str) else registered
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            found.setdefault(f"pytorch_optimizer.{cls.__name__}", cls)
    return found


def all_optimizers() -> dict[str, type]:
    return {**timm_optimizers(), **pytorch_optimizer_optimizers()}


def _load_one(name: str) -> type:
    library = name.split(".", 1)[0]
    found = timm_optimizers() if library == "timm" else pytorch_optimizer_optimizers()
    if name not in found:
        raise KeyError(f"unknown optimizer {name!r}")
    return found[name]


# --------------------------------------------------------------------------------------------------------------------
# Constructor arguments and exclusions
# --------------------------------------------------------------------------------------------------------------------

_STOCK = "re-export of stock torch.optim.{} (covered by optcapture's own optim_db suite)"

EXCLUDED: dict[str, str] = {
    # timm
    "timm.Adahessian": "needs a Hessian: loss.backward(create_graph=True) before each step",
    "timm.Lookahead": "wrapper around another optimizer",
    # pytorch_optimizer: stock torch.optim classes in its registry
    **{f"pytorch_optimizer.{n}": _STOCK.format(n) for n in ("SGD", "Adam", "AdamW", "NAdam", "RMSprop")},
    "pytorch_optimizer.LBFGS": "stock torch.optim.LBFGS: step needs a closure",
    # pytorch_optimizer
    "pytorch_optimizer.AdaHessian": "needs a Hessian: loss.backward(create_graph=True) (or hessian=) each step",
    "pytorch_optimizer.SophiaH": "needs a Hessian: loss.backward(create_graph=True) (or hessian=) each step",
    "pytorch_optimizer.AdaLOMO": "takes a model object (fuses the update into backward hooks)",
    "pytorch_optimizer.LOMO": "takes a model object (fuses the update into backward hooks)",
    "pytorch_optimizer.AdamMini": "takes a model object (partitions params by module names)",
    "pytorch_optimizer.Magma": "wrapper around another optimizer",
    "pytorch_optimizer.BSAM": "SAM-style: step needs a closure (and num_data)",
    "pytorch_optimizer.AliG": "step needs a closure returning the loss",
    "pytorch_optimizer.DistributedMuon": "needs an initialized torch.distributed process group",
    "pytorch_optimizer.DeMo": "needs an initialized torch.distributed process group (all_gather) and einops",
}
"""Optimizers that :func:`main` does not try, with the reason."""

KWARGS: dict[str, dict[str, Any]] = {
    "timm.SGDP": {"lr": DEFAULT_LR},  # lr is required
    "pytorch_optimizer.Ranger21": {"num_iterations": 100},
}
"""Constructor arguments beyond ``lr`` (see :func:`constructor_kwargs`)."""

KEEP_DEFAULT_LR: dict[str, str] = {
    "pytorch_optimizer.DAdaptAdaGrad": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.DAdaptAdam": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.DAdaptAdan": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.DAdaptLion": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.DAdaptSGD": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.Prodigy": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.AdamG": "learning-rate free (lr is a multiplier, 1.0)",
    "pytorch_optimizer.AdaDelta": "lr is a multiplier of the adaptive step (1.0)",
    "timm.AdafactorBigVision": "lr is scheduled externally; default 1.0",
}
"""Optimizers whose default ``lr`` is kept (besides those whose default is ``None``, e.g. relative-step ones)."""




def _muon_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    return [{"params": [p for p in params if p.ndim >= 2], "use_muon": True},
            {"params": [p for p in params if p.ndim < 2], "use_muon": False}]


def _matrices(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.ndim == 2]


PARAMS: dict[str, Callable[[list[nn.Parameter]], Any]] = {
    # pytorch_optimizer's Muon family: param groups with a `use_muon` flag (Muon for matrices, AdamW for the rest)
    **{f"pytorch_optimizer.{n}": _muon_groups for n in ("Muon", "MuonClip", "NorMuon", "AdaMuon", "AdaGO")},
    # 2-D params only (the others would be given to a second optimizer)
    "pytorch_optimizer.SpectralSphere": _matrices,
    # LoRA factor pairs in order (A, B): (16, 8) has rank dim 0 = 16, (4, 16) has rank dim -1 = 16
    "pytorch_optimizer.LoRARite": _matrices,
}
"""What to pass as ``params`` where the plain list of the model's params does not do (default: that list)."""


def params_argument(name: str, params: list[nn.Parameter]) -> Any:
    return PARAMS[name](params) if name in PARAMS else params


def constructor_kwargs(name: str, cls: type) -> dict[str, Any]:
    """``lr=1e-3`` where the constructor takes ``lr`` (unless its default is ``None`` or listed in
    :data:`KEEP_DEFAULT_LR`), updated by :data:`KWARGS`."""
    kwargs: dict[str, Any] = {}
    lr = inspect.signature(cls).parameters.get("lr")
    if lr is not None and name not in KEEP_DEFAULT_LR and lr.default is not None:
        kwargs["lr"] = DEFAULT_LR
    kwargs.update(KWARGS.get(name, {}))
    return kwargs


# --------------------------------------------------------------------------------------------------------------------
# One optimizer
# --------------------------------------------------------------------------------------------------------------------

PARAM_SHAPES: tuple[tuple[int, ...], ...] = ((16, 8), (8,), (4, 16), (4,))


@dataclasses.dataclass
class Result:
    name: str
    backend: str  # "eager" when the eager optimizer itself failed (then error says how)
    ok: bool
    max_param_diff: float
    max_state_diff: float
    error: str | None
    paths: list[str]
    warnings: list[str]
    seconds: float
    reasons: list[str] = dataclasses.field(default_factory=list)
    """optcapture: the reasons of the last report (``explain(opt)[-1].reasons``)."""
    all_reasons: list[str] = dataclasses.field(default_factory=list)
    """optcapture: the reasons of every report, deduplicated, oldest first."""
    mismatches: list[str] = dataclasses.field(default_factory=list)
    """What differs from eager beyond tolerance (first few), e.g. ``"param 0"``, ``"state 2 'exp_avg'"``."""
    graphs: int = 0
    """Graphs Dynamo compiled (``counters["stats"]["unique_graphs"]``)."""
    graph_breaks: int = 0
    graph_break_reasons: list[str] = dataclasses.field(default_factory=list)
    """Dynamo's graph-break reasons (first line of each, deduplicated)."""
    kwargs: str = ""
    optcapture: str = ""
    """The optcapture that ran: its directory and a hash of its sources (the package may change between runs)."""


class _Params(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(shape) * 0.5) for shape in PARAM_SHAPES)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def _to_float(value: Any) -> float:
    return float(value) if math.isfinite(float(value)) else math.inf


def _diff(a: Any, b: Any) -> tuple[float, bool] | None:
    """(max abs diff, within tolerance) for two tensors or Python numbers; None for other values (not compared)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return math.inf, False
        if a.is_complex() or b.is_complex():
            a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
        a64, b64 = a.detach().double(), b.detach().double()
        close = bool(torch.isclose(b64, a64, rtol=RTOL, atol=ATOL, equal_nan=True).all()) if a.numel() else True
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        diff = (a64 - b64).abs().masked_fill(both_nan, 0.0)
        worst = _to_float(diff.max()) if diff.numel() else 0.0
        return (worst if not math.isnan(worst) else math.inf), close
    numbers = (int, float, bool)
    if isinstance(a, numbers) and isinstance(b, numbers):
        if math.isnan(float(a)) and math.isnan(float(b)):
            return 0.0, True
        return abs(float(a) - float(b)), math.isclose(float(b), float(a), rel_tol=RTOL, abs_tol=ATOL)
    # A Python number on one side and a one-element tensor on the other (a counter moved to a tensor, say).
    if isinstance(a, numbers) and isinstance(b, torch.Tensor) and b.numel() == 1:
        return _diff(torch.tensor(float(a), dtype=torch.float64), b.detach().double().reshape(()))
    if isinstance(b, numbers) and isinstance(a, torch.Tensor) and a.numel() == 1:
        return _diff(a.detach().double().reshape(()), torch.tensor(float(b), dtype=torch.float64))
    return None


def _grads(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=generator) * 0.1 for shape in PARAM_SHAPES]


def _step_eagerly(opt: torch.optim.Optimizer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()


_MISSING = "missing"


def _compare(eager: torch.optim.Optimizer, compiled: torch.optim.Optimizer, eager_params: list[nn.Parameter],
             params: list[nn.Parameter], result: Result) -> None:
    ok = True
    max_param, max_state = 0.0, 0.0

    def note(what: str) -> None:
        if len(result.mismatches) < 12:
            result.mismatches.append(what)

    for i, (p_eager, p) in enumerate(zip(eager_params, params, strict=True)):
        diff, close = _diff(p_eager, p) or (math.inf, False)
        max_param = max(max_param, diff)
        if not close:
            ok = False
            note(f"param {i} (max diff {diff:.3g})")
        state_eager, state = eager.state.get(p_eager, {}), compiled.state.get(p, {})
        for key in sorted(set(state_eager) | set(state), key=str):
            if key not in state or key not in state_eager:
                ok = False
                note(f"state {i} {key!r} only in {'eager' if key in state_eager else 'compiled'}")
                continue
            compared = _diff(state_eager[key], state[key])
            if compared is None:
                continue
            diff, close = compared
            max_state = max(max_state, diff)
            if not close:
                ok = False
                note(f"state {i} {key!r} (max diff {diff:.3g})")
    # Counters and other numbers some optimizers keep in the param group (group["step"], ...).
    for g, (group_eager, group) in enumerate(zip(eager.param_groups, compiled.param_groups, strict=True)):
        for key, value in group_eager.items():
            if key == "params" or key not in group:
                continue
            compared = _diff(value, group[key])
            if compared is None:
                continue
            diff, close = compared
            max_state = max(max_state, diff)
            if not close:
                ok = False
                note(f"group {g} {key!r}: {group[key]!r} vs eager {value!r}")
    # Numbers the optimizer keeps in its own attributes (``self.prev_loss = loss``): Dynamo does not write them back
    # for torch.optim.Optimizer objects, so a compiled step may leave them behind eager's.
    for key, value in vars(eager).items():
        if key.startswith("_") or not isinstance(value, (bool, int, float, type(None))):
            continue
        if getattr(compiled, key, _MISSING) != value and not (isinstance(value, float) and math.isnan(value)):
            ok = False
            note(f"attribute {key!r}: {getattr(compiled, key, _MISSING)!r} vs eager {value!r}")
    result.ok = ok and result.error is None
    result.max_param_diff, result.max_state_diff = max_param, max_state


def _dynamo_counts() -> tuple[int, int, list[str]]:
    from torch._dynamo.utils import counters

    reasons = list(dict.fromkeys(str(reason).strip().splitlines()[0][:300] for reason in counters["graph_break"]))
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values())), reasons


def optcapture_fingerprint() -> str:
    """``"<package dir>@<sha256 of its .py sources, 12 hex>"`` of the optcapture this process imports."""
    import optcapture

    root = Path(optcapture.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return f"{root}@{digest.hexdigest()[:12]}"


def try_optimizer(name: str, cls: type, backend: str, steps: int = 5, seed: int = 0) -> Result:
    """Step ``cls`` eagerly and through ``torch.compile(opt.step, backend=backend)`` on the same grads; compare.

    ok: params and every state entry (tensors, Python numbers; and numbers in the param groups) within
    atol=rtol=1e-5 of eager after ``steps`` steps, and no exception. An exception from the eager optimizer
    (constructing or stepping) gives a Result with backend "eager" and that error.
    """
    import optcapture

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    torch._dynamo.reset()
    optcapture.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    began = time.perf_counter()
    kwargs = constructor_kwargs(name, cls)
    result = Result(name=name, backend=backend, ok=False, max_param_diff=math.nan, max_state_diff=math.nan,
                    error=None, paths=[], warnings=[], seconds=0.0, kwargs=repr(kwargs),
                    optcapture=optcapture_fingerprint())
    torch.manual_seed(seed)
    eager_model = _Params()
    compiled_model = _Params()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager_params, params = list(eager_model.parameters()), list(compiled_model.parameters())

    try:
        _seed_everything(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = cls(params_argument(name, eager_params), **kwargs)
    except Exception as error:  # noqa: BLE001 - recorded, the optimizer is skipped
        return _eager_failed(result, error, began)

    seen: dict[str, None] = {}
    compiled: torch.optim.Optimizer | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _seed_everything(seed)
            compiled = cls(params_argument(name, params), **kwargs)
            step = torch.compile(compiled.step, backend=backend)
        except Exception as error:  # noqa: BLE001
            result.error = repr(error)
        generator = torch.Generator().manual_seed(seed)
        for i in range(steps):
            grads = _grads(generator)
            for p, q, g in zip(eager_params, params, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            try:
                _seed_everything(seed * 1000 + i)
                _step_eagerly(eager)
            except Exception as error:  # noqa: BLE001
                return _eager_failed(result, error, began)
            if result.error is not None:
                continue
            try:
                _seed_everything(seed * 1000 + i)
                step()
            except Exception as error:  # noqa: BLE001
                result.error = f"step {i}: {error!r}"
    for warning in caught:
        seen.setdefault(str(warning.message), None)
    result.warnings = list(seen)
    if compiled is not None:
        if backend == "optcapture":
            reports = optcapture.explain(compiled)
            result.paths = [r.path for r in reports]
            result.reasons = list(reports[-1].reasons) if reports else []
            result.all_reasons = list(dict.fromkeys(reason for r in reports for reason in r.reasons))
        _compare(eager, compiled, eager_params, params, result)
    result.graphs, result.graph_breaks, result.graph_break_reasons = _dynamo_counts()
    result.seconds = time.perf_counter() - began
    return result


def _eager_failed(result: Result, error: Exception, began: float) -> Result:
    result.backend, result.ok, result.error = "eager", False, repr(error)
    result.seconds = time.perf_counter() - began
    return result


# --------------------------------------------------------------------------------------------------------------------
# Survey (one subprocess per optimizer and backend)
# --------------------------------------------------------------------------------------------------------------------


def _failed(name: str, backend: str, error: str, seconds: float) -> dict[str, Any]:
    return {"name": name, "backend": backend, "ok": False, "max_param_diff": math.nan, "max_state_diff": math.nan,
            "error": error, "paths": [], "warnings": [], "seconds": seconds, "reasons": [], "all_reasons": [],
            "mismatches": [], "graphs": 0, "graph_breaks": 0, "graph_break_reasons": [], "kwargs": ""}


def run_in_subprocess(name: str, backends: list[str], steps: int, timeout: float,
                      env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run one optimizer on ``backends`` (in that order) in a fresh Python process; ``timeout`` seconds per backend.

    The child prints one result line per backend as soon as it has it. A backend that crashes or hangs gets an
    error result, and the backends after it run in a new process.
    """
    results: dict[str, dict[str, Any]] = {}
    while len(results) < len(backends):
        remaining = backends[len(results):]
        began = time.perf_counter()
        got, error = _run_child(name, remaining, steps, timeout, env)
        results.update(got)
        if len(got) < len(remaining):
            failed = remaining[len(got)]
            results[failed] = _failed(name, failed, error or "no result", time.perf_counter() - began)
    return results


def _run_child(name: str, backends: list[str], steps: int, timeout: float,
               env: dict[str, str] | None) -> tuple[dict[str, dict[str, Any]], str]:
    command = [sys.executable, os.path.abspath(__file__), "--one", name, "--backend", ",".join(backends),
               "--steps", str(steps)]
    results: dict[str, dict[str, Any]] = {}
    error = ""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        assert child.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while True:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    error = f"timeout after {timeout:.0f} s"
                    child.kill()
                    break
                line = child.stdout.readline()
                if not line:  # the child exited
                    break
                if line.startswith(RESULT_PREFIX):
                    result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
                    results[backends[len(results)]] = result
                    deadline = time.monotonic() + timeout
        returncode = child.wait()
        if not error and len(results) < len(backends):
            stderr.seek(0)
            tail = " | ".join(stderr.read().strip().splitlines()[-3:])
            error = f"subprocess exited {returncode} without a result: {tail}"
    return results, error


def _runs(paths: list[str]) -> str:
    """``["eager", "bucketed", "bucketed"]`` -> ``"eager,bucketed x2"``."""
    runs: list[list[Any]] = []
    for path in paths:
        if runs and runs[-1][0] == path:
            runs[-1][1] += 1
        else:
            runs.append([path, 1])
    return ",".join(path if count == 1 else f"{path} x{count}" for path, count in runs)


def _cell(result: dict[str, Any] | None, with_paths: bool) -> str:
    if result is None:
        return "-"
    if result["backend"] == "eager" and result.get("error"):
        return "eager failed"
    status = "ok" if result["ok"] else ("raised" if result.get("error") else "WRONG")
    diff = max(result.get("max_param_diff", math.nan), result.get("max_state_diff", math.nan))
    text = f"{status} {diff:.1e}" if not math.isnan(diff) else status
    if with_paths:
        text += " " + (_runs(result.get("paths") or []) or "(no report)")
    return text


def _compiled_by_inductor(result: dict[str, Any] | None) -> bool:
    return bool(result and result.get("ok") and result.get("graphs", 0) > 0)


def summarize(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """Names per category: (a) optcapture wrong where inductor right, (b) optcapture raised where inductor didn't,
    (c) bucketed by the last step, (d) left eager (no "bucketed" or "per-tensor" report, or no report at all) while
    inductor compiled and matched eager, (e) of those with no report at all, the ones where Dynamo handed neither
    backend the update (it ran the step's frame eagerly for both; optcapture compiled as many graphs, the same
    pieces around it, with Inductor): not optcapture's to compile, listed apart from (d)."""
    categories: dict[str, list[str]] = {"a_wrong_where_inductor_right": [], "b_raised_where_inductor_did_not": [],
                                        "c_bucketed_last": [], "d_left_eager_while_inductor_compiled": [],
                                        "e_update_reached_neither_backend": [], "eager_failed": []}
    for name, by_backend in results.items():
        ours, inductor = by_backend.get("optcapture"), by_backend.get("inductor")
        if ours is None:
            continue
        if ours["backend"] == "eager" and ours.get("error"):
            categories["eager_failed"].append(name)
            continue
        inductor_raised = inductor is None or bool(inductor.get("error"))
        if not ours["ok"] and not ours.get("error") and inductor is not None and inductor["ok"]:
            categories["a_wrong_where_inductor_right"].append(name)
        if ours.get("error") and not inductor_raised:
            categories["b_raised_where_inductor_did_not"].append(name)
        paths = ours.get("paths") or []
        if paths and paths[-1] == "bucketed":
            categories["c_bucketed_last"].append(name)
        if not {"bucketed", "per-tensor"} & set(paths) and _compiled_by_inductor(inductor):
            assert inductor is not None
            neither = not paths and ours.get("graphs", 0) >= inductor.get("graphs", 0)
            category = "e_update_reached_neither_backend" if neither else "d_left_eager_while_inductor_compiled"
            categories[category].append(name)
    return categories


def markdown(results: dict[str, dict[str, dict[str, Any]]], backends: list[str]) -> str:
    lines = ["| optimizer | optcapture ok/diff/paths | inductor ok/diff | notes |", "|---|---|---|---|"]
    for name, by_backend in sorted(results.items(), key=lambda item: item[0].lower()):
        ours, inductor = by_backend.get("optcapture"), by_backend.get("inductor")
        notes = []
        for result in (ours, inductor):
            if result and result.get("error"):
                notes.append(f"{result['backend']}: {result['error'][:140]}")
        if ours and not ours["ok"] and ours.get("mismatches"):
            notes.append("differs: " + "; ".join(ours["mismatches"][:2]))
        if ours and ours.get("reasons"):
            notes.append("reason: " + ours["reasons"][0][:160])
        cells = [_cell(ours, True) if "optcapture" in backends else "-",
                 _cell(inductor, False) if "inductor" in backends else "-"]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {' / '.join(notes).replace('|', '/')} |")
    return "\n".join(lines)


def _selected(names: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return [n for n in names if n not in EXCLUDED]
    return [n for n in names if any(s.lower() in n.lower() for s in only)]


def _environment(optcapture_dir: str | None) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    versions = {"torch": torch.__version__}
    for package in ("pytorch_optimizer", "timm"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001
            versions[package] = "not installed"
    return {"versions": versions, "commit": git("rev-parse", "HEAD"),
            "optcapture_dirty": bool(git("status", "--porcelain", "--", "optcapture")),
            "optcapture_dir": os.path.abspath(optcapture_dir) if optcapture_dir else "installed"}


PRIORITY = tuple(f"pytorch_optimizer.{n}" for n in (
    "AdaBelief", "Adan", "APOLLO", "DiffGrad", "AdEMAMix", "ADOPT", "Grams", "Yogi", "MADGRAD", "AdaBound", "CAME",
    "LaProp", "Lion", "Lamb", "LARS", "NovoGrad", "StableAdamW", "MARS", "ScheduleFreeAdamW", "ScheduleFreeSGD",
    "AdamP", "SGDP", "Ranger", "Tiger", "Prodigy", "DAdaptAdam", "Nero", "SignSGD", "Adai", "AggMo", "QHAdam", "PID",
    "Kron", "SOAP", "Muon", "Shampoo", "AdaFactor", "Ranger21", "SM3", "GaLore"))
"""pytorch_optimizer's representative optimizers: with ``--budget``, these run right after timm's."""


def _ordered(names: list[str]) -> list[str]:
    def rank(name: str) -> tuple[int, int]:
        if name.startswith("timm."):
            return 0, 0
        return (1, PRIORITY.index(name)) if name in PRIORITY else (2, 0)

    return sorted(names, key=rank)  # stable: alphabetical (registry order) within each rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="substring of the optimizer names to run (repeatable); "
                        "also selects excluded ones")
    parser.add_argument("--backends", default="optcapture,inductor", help="comma-separated: optcapture,inductor,eager")
    parser.add_argument("--out", help="write every result (and the summary) to this JSON file")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=SUBPROCESS_TIMEOUT_S,
                        help="seconds per optimizer and backend (each optimizer runs in its own subprocess)")
    parser.add_argument("--budget", type=float, help="start no new optimizer after this many seconds (the rest are "
                        "listed as not_run); timm and PRIORITY run first")
    parser.add_argument("--list", action="store_true", help="list the optimizers found, with exclusions, and exit")
    parser.add_argument("--optcapture", metavar="DIR", help="import optcapture from DIR (a directory holding the "
                        "optcapture package, e.g. `git archive HEAD optcapture | tar -x -C DIR`) instead of the "
                        "installed one")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.one:
        cls = _load_one(args.one)
        eager_failed = None
        for backend in (args.backend or "optcapture").split(","):
            result = eager_failed or try_optimizer(args.one, cls, backend, steps=args.steps)
            if result.backend == "eager" and result.error:
                eager_failed = result  # nothing to compare on the other backends either
            print(RESULT_PREFIX + json.dumps(dataclasses.asdict(result)), flush=True)
        return 0

    found = all_optimizers()
    if args.list:
        for name in found:
            print(name, f"EXCLUDED: {EXCLUDED[name]}" if name in EXCLUDED else constructor_kwargs(name, found[name]))
        for module, why in TIMM_SKIPPED_MODULES.items():
            print(f"timm/optim/{module}.py not imported: {why}")
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}")
    names = _ordered(_selected(list(found), args.only))
    env = None
    if args.optcapture:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(args.optcapture), env.get("PYTHONPATH")]))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    began = time.perf_counter()
    out: dict[str, Any] = {"environment": _environment(args.optcapture), "backends": backends, "steps": args.steps,
                           "excluded": {n: EXCLUDED[n] for n in found if n in EXCLUDED},
                           "timm_skipped_modules": dict(TIMM_SKIPPED_MODULES), "results": results, "not_run": []}

    def save() -> None:
        if args.out:
            out["summary"] = summarize(results)
            out["seconds"] = time.perf_counter() - began
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    for name in names:
        if args.budget is not None and time.perf_counter() - began > args.budget:
            out["not_run"].append(name)
            continue
        results[name] = run_in_subprocess(name, backends, args.steps, args.timeout, env)
        for backend, done in results[name].items():
            print(f"[{time.perf_counter() - began:6.0f}s] {name} {backend}: {_cell(done, backend == 'optcapture')}"
                  f"{' ' + done['error'][:120] if done.get('error') else ''}", file=sys.stderr, flush=True)
        save()
    save()
    print(markdown(results, backends))
    print()
    for category, members in summarize(results).items():
        print(f"- {category}: {len(members)}" + (f" ({', '.join(members)})" if members else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
