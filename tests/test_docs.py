"""docs/api.md is generated from the docstrings (docs/gen_api.py) and must be current; every public name, option
and report field is documented; the compatibility table lists every stock optimizer of the installed torch."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import optcapture

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _measured() -> dict[str, Any]:
    return json.loads(gen.COMPAT_JSON.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_api_md_is_current() -> None:
    expected = gen.generate(_measured())
    actual = gen.API_MD.read_text(encoding="utf-8")
    assert actual == expected, f"docs/api.md is stale: run `{gen.REGENERATE}` and commit docs/api.md"


def test_every_public_name_option_and_field_is_documented() -> None:
    text = gen.API_MD.read_text(encoding="utf-8")
    for name in optcapture.__all__:
        if name != "__version__":
            assert f"### `optcapture.{name}" in text, name
    for cls in (optcapture.CaptureConfig, optcapture.CaptureReport, optcapture.Stats):
        documented = gen.attribute_docs(cls)
        for field in dataclasses.fields(cls):
            assert documented.get(field.name, "").strip(), f"{cls.__name__}.{field.name} has no docstring"
            assert f"| `{field.name}` |" in text, field.name


def test_a_field_without_a_docstring_fails_the_generator() -> None:
    @dataclasses.dataclass
    class Undocumented:
        documented: int = 0
        """Has one."""
        bare: int = 0

    with pytest.raises(SystemExit, match="Undocumented.bare has no docstring"):
        gen.fields_table(Undocumented, with_defaults=True)


def test_docstring_roles_become_markdown() -> None:
    assert gen.markdown("see :class:`~optcapture.OptionError` and ``x = 1``") == "see `OptionError` and `x = 1`"
    assert gen.markdown(":func:`optcapture.stats`") == "`optcapture.stats`"


def test_compatibility_table_lists_every_stock_optimizer_with_its_cpu_path() -> None:
    measured = _measured()
    rows = measured["rows"]
    names = {row["optimizer"] for row in rows}
    assert {cls.__name__ for cls in gen.stock_optimizers()} == names
    assert {"Adam", "AdamW", "SGD", "LBFGS", "SparseAdam"} <= names
    for row in rows:
        cell = gen.cpu_cell(row)
        assert cell and (row["paths"] or row["error"] or row["captures"] == 0), row
    table = gen.API_MD.read_text(encoding="utf-8").split("### Stock optimizers", 1)[1]
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1  # the header, then each row


def test_cuda_column_says_only_what_tests_gpu_asserts() -> None:
    import torch

    assert gen.gpu_cell(torch.optim.Adam, {"fused": True}) == "not tested on CUDA"
    assert gen.gpu_cell(torch.optim.Adafactor, {}) == "not tested on CUDA"
    default = gen.gpu_cell(torch.optim.Adam, {})
    assert default.startswith("bucketed, 1 CUDA graph (asserted: case `default`, default suite"), default
    assert "-m exhaustive" in gen.gpu_cell(torch.optim.Adam, {"capturable": True})


def test_readme_links_the_reference() -> None:
    assert "(docs/api.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.exhaustive
def test_measured_cpu_paths_are_current() -> None:
    import torch

    measured = _measured()
    if measured["torch"] != torch.__version__:
        pytest.skip(f"docs/compat-cpu.json was measured on torch {measured['torch']}")
    fresh = gen.measure_all()
    now = [(row["optimizer"], row["variant"], gen.cpu_cell(row).split(" (")[0]) for row in fresh["rows"]]
    then = [(row["optimizer"], row["variant"], gen.cpu_cell(row).split(" (")[0]) for row in measured["rows"]]
    assert now == then, f"re-run `{gen.REGENERATE} --measure` and commit docs/compat-cpu.json and docs/api.md"
