"""Smoke test of ``python -m optcapture.bench --device cpu --quick`` (the GPU run is in the README)."""

from __future__ import annotations

import json
from pathlib import Path

from optcapture.bench import methods
from optcapture.bench.__main__ import main


def test_quick_cpu_run_prints_every_method_and_agrees_with_eager(tmp_path: Path, capsys: object) -> None:
    assert main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out  # type: ignore[attr-defined]
    for method in methods.METHODS:
        assert f"| small | {method} |" in table, table
    assert "NO (" not in table
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in payload["results"]} == set(methods.METHODS)
    assert all(r["max_abs_diff"] is None or r["max_abs_diff"] <= 1e-4 for r in payload["results"])
    # The first 4 calls include the first; SGD-like steps are captured in their second call, hence the column.
    assert "| first call s | first 4 calls s |" in table
    assert all(r["warm_up_s"] >= r["first_call_s"] > 0 for r in payload["results"])
    assert (tmp_path / "chart.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().startswith("optcapture.bench: adamw on CPU")


def test_bandwidth_floor_bytes() -> None:
    assert methods.BYTES_PER_PARAM["adamw"] == 28 and methods.BYTES_PER_PARAM["sgd"] == 20


def test_merge_combines_earlier_runs(tmp_path: Path, capsys: object) -> None:
    from optcapture.bench.measure import Result
    from optcapture.bench.report import write

    header = {"optimizer": "adamw", "device_name": "X", "torch": "t", "date": "d", "bandwidth_gbs": 1.0}
    for preset, step in (("gpt2", 2.0), ("small", 0.5)):
        row = Result(preset, "optcapture", step, 0.1, 1.0, 3, 0.0, 1.0, 0.0)
        write(tmp_path / preset, [row], header, "t")
    capsys.readouterr()  # type: ignore[attr-defined]
    assert main(["--merge", str(tmp_path / "gpt2"), str(tmp_path / "small"), "--out", str(tmp_path / "all")]) == 0
    table = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "| gpt2 | optcapture | 2.000 | 0.50 |" in table and "| small | optcapture | 0.500 | 2.00 |" in table
    assert (tmp_path / "all" / "chart.png").exists()
