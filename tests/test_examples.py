"""The examples run at toy size and check themselves against eager."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optcapture

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_matches_eager_and_compiles_once(capsys: object) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "01_quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    difference = module.main(steps=6, device="cpu")
    assert difference <= 1e-4
    assert optcapture.stats()["bucketed"] == 1
