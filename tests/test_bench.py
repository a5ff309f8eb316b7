"""``python -m optcapture.bench`` on the CPU with ``--quick`` sizes, and :func:`optcapture.bench.compare`.

The GPU runs are in the README. Every test that times runs few blocks of few steps: they check what is printed and
compared, not the numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optcapture.bench import Result, compare, fsdp2, methods, presets
from optcapture.bench.__main__ import main
from optcapture.bench.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
FEW = ["--blocks", "2", "--steps", "2"]


def _rows(table: str, preset: str) -> dict[str, list[str]]:
    """Cells of each method's row of ``preset`` in a markdown table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == preset:
            rows[cells[1]] = cells
    return rows


def test_quick_cpu_run_prints_every_method_and_agrees_with_eager(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                  ) -> None:
    assert main(["--device", "cpu", "--quick", "--blocks", "3", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert set(_rows(table, "small")) == set(methods.METHODS), table
    assert "NO (" not in table
    assert "| step ms | spread | × fused |" in table and "| first call s | first 4 calls s |" in table
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in payload["results"]} == set(methods.METHODS)
    assert all(len(r["step_blocks_ms"]) == 3 and len(r["host_blocks_ms"]) == 3 for r in payload["results"])
    assert all(r["max_abs_diff"] is None or r["max_abs_diff"] <= 1e-4 for r in payload["results"])
    # The first 4 calls include the first; SGD-like steps are captured in their second call, hence the column.
    assert all(r["warm_up_s"] >= r["first_call_s"] > 0 for r in payload["results"])
    assert "bucketed" in _rows(table, "small")["optcapture"][-1]
    assert (tmp_path / "chart.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().startswith("optcapture.bench: adamw on CPU")


def test_bandwidth_floor_bytes() -> None:
    assert methods.BYTES_PER_PARAM["adamw"] == 28 and methods.BYTES_PER_PARAM["sgd"] == 20


def test_merge_combines_earlier_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from optcapture.bench.report import write

    header = {"optimizer": "adamw", "device_name": "X", "torch": "t", "date": "d", "bandwidth_gbs": 1.0}
    for preset, step in (("gpt2", 2.0), ("small", 0.5)):
        row = Result(preset, "optcapture", step, 0.1, 1.0, 3, 0.0, 1.0, 0.0, step_blocks_ms=(step, 3.0))
        write(tmp_path / preset, [row], header, "t")
    capsys.readouterr()
    assert main(["--merge", str(tmp_path / "gpt2"), str(tmp_path / "small"), "--out", str(tmp_path / "all")]) == 0
    table = capsys.readouterr().out
    gpt2, small = _rows(table, "gpt2")["optcapture"], _rows(table, "small")["optcapture"]
    assert gpt2[2:4] == ["2.000", "2.000–3.000"] and "0.50" in gpt2 and small[2] == "0.500" and "2.00" in small
    assert (tmp_path / "all" / "chart.png").exists()


def test_blocks_alternate_between_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method is built and warmed up first, then blocks of steps rotate through the methods."""
    calls: list[str] = []

    def recording(name: str) -> methods.Variant:
        def build(optimizer: torch.optim.Optimizer, device: torch.device) -> methods.Setup:
            def step() -> None:
                calls.append(name)
                optimizer.step()

            return methods.Setup(optimizer, step)

        return build

    for name in ("eager", "a", "b"):
        monkeypatch.setitem(methods.VARIANTS, name, recording(name))
    model = torch.nn.Linear(4, 2)
    comparison = compare(model, methods=["eager", "a", "b"], blocks=3, steps=2)
    warm_ups = ["eager"] * 4 + ["a"] * 4 + ["b"] * 4
    blocks = (["eager"] * 2 + ["a"] * 2 + ["b"] * 2 + ["a"] * 2 + ["b"] * 2 + ["eager"] * 2
              + ["b"] * 2 + ["eager"] * 2 + ["a"] * 2)
    assert calls == [*warm_ups, *blocks, "eager", "a", "b"]
    assert [r.method for r in comparison.results] == ["eager", "a", "b"]
    assert all(len(r.step_blocks_ms) == 3 for r in comparison.results)
    assert comparison.results[1].max_abs_diff == 0.0  # the same AdamW steps as eager's, on a copy


def test_a_method_that_raises_is_reported_and_the_others_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(optimizer: torch.optim.Optimizer, device: torch.device) -> methods.Setup:
        def step() -> None:
            raise RuntimeError("no kernel for this")

        return methods.Setup(optimizer, step)

    monkeypatch.setitem(methods.VARIANTS, "broken", broken)
    comparison = compare(torch.nn.Linear(4, 2), methods=["eager", "broken", "fused"], blocks=2, steps=1)
    assert [r.method for r in comparison.results] == ["eager", "fused"]
    assert comparison.header["notes"] == ["model broken failed: RuntimeError: no kernel for this"]
    assert "- model broken failed: RuntimeError: no kernel for this" in comparison.table()


def test_compare_times_a_model_without_changing_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    comparison = compare(model, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
                         methods=["eager", "fused", "optcapture"], blocks=3, steps=2)
    assert [r.method for r in comparison.results] == ["eager", "fused", "optcapture"]
    for r in comparison.results:
        low, high = r.step_spread
        assert len(r.step_blocks_ms) == 3 and 0 < low <= r.step_ms <= high
        host_low, host_high = r.host_spread
        assert 0 < host_low <= r.host_ms <= host_high
    assert comparison.results[0].max_abs_diff is None
    assert all(r.max_abs_diff is not None and r.max_abs_diff <= 1e-4 for r in comparison.results[1:])
    assert comparison.ok and comparison.header["optimizer"] == "Adam"
    assert comparison.results[2].path.startswith("bucketed"), comparison.results[2].path
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert "| model | optcapture |" in str(comparison)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
def test_an_optimizer_computing_in_bfloat16_is_held_to_a_bfloat16_tolerance() -> None:
    # Muon's Newton-Schulz runs in bf16: an fp32 limit (1e-4) failed every method but eager on a GPU, stock too.
    matrices = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(2)]
    comparison = compare(matrices, lambda ps: torch.optim.Muon(ps, lr=1e-2), methods=["eager"], blocks=1, steps=1)
    assert [r.tolerance for r in comparison.results] == [5e-4]
    adam = compare(matrices, lambda ps: torch.optim.Adam(ps, lr=1e-2), methods=["eager"], blocks=1, steps=1)
    assert [r.tolerance for r in adam.results] == [1e-4]


def test_model_option_times_a_factory_with_its_own_optimizer(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    spec = "tests.bench.models:tiny_mlp_with_sgd"
    assert main(["--device", "cpu", "--model", spec, "--methods", "eager,fused,optcapture", *FEW]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "tiny_mlp_with_sgd")
    assert set(rows) == {"eager", "fused", "optcapture"}, out
    assert out.startswith("optcapture.bench: SGD on CPU")
    assert rows["fused"][-2].startswith("ok") and rows["optcapture"][-2].startswith("ok")
    # SGD creates its momentum buffers in its first step, which runs as traced; the next call is captured.
    assert "first-step" in rows["optcapture"][-1] and "bucketed" in rows["optcapture"][-1]


def test_fused_and_tensor_lr_variants_keep_hyperparameters() -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    sgd = torch.optim.SGD([{"params": params, "lr": 0.5}], lr=0.1, momentum=0.9, nesterov=True)
    fused = methods.with_fused(sgd)
    assert isinstance(fused, torch.optim.SGD)
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["lr"] == 0.5
    assert fused.param_groups[0]["nesterov"] is True and fused.param_groups[0]["params"][0] is params[0]
    tensor_lr = methods.with_tensor_lr(sgd, torch.device("cpu"))
    assert isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor) and float(tensor_lr.param_groups[0]["lr"]) == 0.5
    lion = methods.Lion(params, lr=1e-3)
    assert isinstance(methods.with_fused(lion), methods.Skipped)
    assert methods.with_tensor_lr(lion, torch.device("cpu")) is lion  # user-written: lr stays a number


def _training_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str, *extra: str) -> list[dict]:
    assert main(["--device", "cpu", "--quick", "--preset", preset, *FEW, *extra, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = _rows(table, preset)
    assert set(rows) == set(methods.TRAIN_METHODS), table
    assert "| iteration ms | spread | × fused | tail host ms |" in table
    assert "NO (" not in table
    for method in ("optcapture", "optcapture-tail"):
        assert "timed steps bucketed" in rows[method][-1], rows[method]
    assert f"{preset} optcapture-tail:" in table  # its explain() reports
    payload = json.loads((tmp_path / "results.json").read_text())["results"]
    assert all(r["unit"] == "iteration" and len(r["step_blocks_ms"]) == 2 for r in payload)
    assert all(r["relative_diff"] is None or r["relative_diff"] <= r["tolerance"] for r in payload)
    return payload  # type: ignore[no-any-return]


def test_train_tiny_preset_runs_every_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _training_run(tmp_path, capsys, "train-tiny")
    # fp32 on the CPU: the methods differ by rounding only.
    assert all(r["relative_diff"] is None or r["relative_diff"] < 1e-3 for r in payload)
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_train_gpt2_preset_with_grad_scaler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = _training_run(tmp_path, capsys, "train-gpt2", "--amp", "fp16")
    assert all(r["relative_diff"] is None or r["relative_diff"] > 0 for r in payload)  # fp16 rounding shows


def test_scaling_preset_steps_with_new_grads_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--quick", "--preset", "scaling", *FEW]) == 0
    table = capsys.readouterr().out
    assert set(_rows(table, "scaling-8")) == set(methods.SCALING_METHODS), table
    # Stock compile's first call grows with the count: it runs only up to the preset's limit unless named.
    assert set(_rows(table, "scaling-32")) == set(methods.SCALING_METHODS) - {"compile"}, table
    assert "NO (" not in table


@pytest.mark.parametrize(("given", "expected"), [([], 1), (["--threads", "2"], 2), (["--threads", "0"], None)])
def test_cpu_methods_run_on_the_threads_the_title_names_and_the_count_is_restored(
        given: list[str], expected: int | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The README's CPU ratios are one thread's: more threads slow fused=True's many small kernels.
    import optcapture.bench.__main__ as bench_main

    before = torch.get_num_threads()
    seen: list[int] = []

    def fake_scaling(*args: object, **kwargs: object) -> list[Result]:
        seen.append(torch.get_num_threads())
        return []

    monkeypatch.setattr(bench_main, "compare_scaling", fake_scaling)
    torch.set_num_threads(3)
    try:
        assert main(["--device", "cpu", "--quick", "--preset", "scaling", "--methods", "fused", *given]) == 0
        assert seen == [expected or 3]
        assert f"threads {expected or 3}" in capsys.readouterr().out.splitlines()[0]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_threads_below_zero_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--quick", "--preset", "scaling", "--threads", "-1"])
    assert "--threads" in capsys.readouterr().err


def test_scaling_counts_take_a_size_per_count() -> None:
    from optcapture.bench.scaling import parse_counts

    assert parse_counts("16x1024, 96x4096,1000", 64) == [(16, 1024), (96, 4096), (1000, 64)]


def _floor_ms(numel: int, header: dict[str, float]) -> float:
    """AdamW's floor over ``numel`` fp32 elements at the run's copy bandwidth (28 bytes each)."""
    return 28 * numel / (header["bandwidth_gbs"] * 1e9) * 1e3


def test_fsdp2_preset_runs_every_method_on_a_rank_of_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert main(["--device", "cpu", "--quick", "--preset", "fsdp2", *FEW, "--out", str(tmp_path)]) == 0
    assert not torch.distributed.is_initialized()  # the one-rank group it made is gone
    table = capsys.readouterr().out
    rows = _rows(table, "fsdp2")
    assert set(rows) == set(methods.FSDP2_METHODS), table
    assert rows["eager"][-2] == "reference"
    for method in ("fused", "compile", "optcapture"):
        assert rows[method][-2].startswith("ok ("), rows[method]
    assert rows["optcapture"][-1].startswith("bucketed;"), rows["optcapture"]
    assert "fsdp2 optcapture:\n  AdamW: bucketed (" in table  # explain()'s report, kernels generated included
    assert table.startswith("optcapture.bench: adamw on CPU") and "(threads 1, ranks 1)" in table
    payload = json.loads((tmp_path / "results.json").read_text())
    # One rank holds every element: the floor is over the whole model, the tied head counted once.
    numel = sum(p.numel() for p in GPT(presets.FSDP2_QUICK.model).parameters())
    assert numel == 136960
    for row in payload["results"]:
        assert row["floor_ms"] == pytest.approx(_floor_ms(numel, payload["header"]), rel=1e-9)
        assert len(row["step_blocks_ms"]) == 2 and row["first_call_s"] > 0


def test_fsdp2_preset_keeps_a_process_group_it_did_not_make() -> None:
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with fsdp2.process_group("cpu") as world:
            assert (world.rank, world.size, world.device) == (0, 1, torch.device("cpu"))
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_preset_steps_adamw_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--quick", "--preset", "fsdp2", "--optimizer", "sgd"])
    assert "steps AdamW only" in capsys.readouterr().err


def test_fsdp2_preset_under_torchrun_reports_rank_0_and_checks_every_rank(tmp_path: Path) -> None:
    # Two ranks over gloo; stock compile left out: its first call of a DTensor step takes ~40 s on a 2-core CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "optcapture.bench", "--device", "cpu", "--quick", "--preset", "fsdp2", *FEW,
               "--methods", "fused,optcapture", "--out", str(tmp_path)]
    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        table, _ = launched.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launched.terminate()  # torchrun stops its workers (own sessions) on SIGTERM before it exits
        launched.communicate(timeout=60)
        raise
    assert launched.returncode == 0, table
    rows = _rows(table, "fsdp2-2ranks")
    assert set(rows) == {"eager", "fused", "optcapture"}, table
    assert table.count("| fsdp2-2ranks | eager |") == 1  # rank 0 alone prints
    assert rows["fused"][-2].startswith("ok (") and rows["optcapture"][-2].startswith("ok ("), table
    assert rows["optcapture"][-1].startswith("bucketed;"), rows["optcapture"]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["header"]["ranks"] == 2
    # Rank 0 holds the first ceil(rows / 2) rows of every param (FSDP2 shards dim 0).
    shapes = [p.shape for p in GPT(presets.FSDP2_QUICK.model).parameters()]
    numel = sum(math.ceil(s[0] / 2) * math.prod(s[1:]) for s in shapes)
    assert all(r["floor_ms"] == pytest.approx(_floor_ms(numel, payload["header"]), rel=1e-9)
               for r in payload["results"])


def test_fsdp2_tolerates_three_times_fused_drift_and_no_less_than_the_step_presets() -> None:
    def row(method: str, diff: float | None) -> Result:
        return Result("fsdp2", method, 1.0, 1.0, 1.0, None, 0.0, 1.0, diff)

    rows = [row("eager", None), row("fused", 2.5e-4), row("optcapture", 6e-4), row("compile", 8e-4)]
    fsdp2.tolerate_fused_drift(rows)
    assert [r.matches for r in rows] == [None, True, True, False]
    quiet = [row("eager", None), row("fused", 1e-7), row("optcapture", 2e-4)]
    fsdp2.tolerate_fused_drift(quiet)
    assert [r.matches for r in quiet] == [None, True, False]  # 1e-4 at least: the step presets' limit
    drifting = [row("eager", None), row("fused", 1e-2), row("optcapture", 2e-3)]
    fsdp2.tolerate_fused_drift(drifting)
    assert [r.matches for r in drifting] == [None, False, False]  # capped at 1e-3: fused drifting far hides nothing
