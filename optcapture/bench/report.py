"""Tables, charts and ``results.json`` of benchmark results.

Invariant: the table and the chart are computed from :class:`~optcapture.bench.results.Result` rows and the run's
header only, so a merged ``results.json`` (``--merge``) prints and plots exactly as the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optcapture.bench.results import Result, Unit, fused_ratio

Column = tuple[str, Callable[[Result, list[Result]], str]]


def header(optimizer: str, device: torch.device, **extra: Any) -> dict[str, Any]:
    """What the run was: optimizer, device, torch version, date, CPU threads (the count in force now), and ``extra``
    (blocks, steps, amp, ...); ``notes`` gets a line for each method skipped or failed."""
    return {"optimizer": optimizer, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "notes": [],
            "threads": torch.get_num_threads() if device.type == "cpu" else None, **extra}


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _spread(low_high: tuple[float, float]) -> str:
    return f"{low_high[0]:.3f}–{low_high[1]:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _match(r: Result) -> str:
    if r.matches is None:
        return "reference" if r.method == "eager" else "-"
    verdict = "ok" if r.matches else "NO"
    if r.unit == "iteration":
        return f"{verdict} (rel {r.relative_diff:.1e}, max {r.max_abs_diff:.1e})"
    return f"{verdict} ({r.max_abs_diff:.1e})"


def _columns(unit: Unit) -> list[Column]:
    timed = "step ms" if unit == "step" else "iteration ms"
    host = "host ms" if unit == "step" else "tail host ms"
    columns: list[Column] = [
        ("preset", lambda r, rs: r.preset),
        ("method", lambda r, rs: r.method),
        (timed, lambda r, rs: _ms(r.step_ms)),
        ("spread", lambda r, rs: _spread(r.step_spread)),
        ("× fused", lambda r, rs: _ratio(fused_ratio(rs, r))),
        (host, lambda r, rs: _ms(r.host_ms)),
        ("host spread", lambda r, rs: _spread(r.host_spread)),
        ("host × fused", lambda r, rs: _ratio(fused_ratio(rs, r, host=True))),
        ("first call s", lambda r, rs: f"{r.first_call_s:.1f}"),
        ("first 4 calls s", lambda r, rs: f"{r.warm_up_s:.1f}"),
    ]
    if unit == "step":
        columns += [("of floor", lambda r, rs: f"{r.of_floor:.2f}" if r.floor_ms > 0 else "-"),
                    ("kernels/step", lambda r, rs: "-" if r.kernels is None else str(r.kernels)),
                    ("peak MB", lambda r, rs: f"{r.peak_mb:.0f}")]
    return [*columns, ("matches eager", lambda r, rs: _match(r)), ("optcapture path", lambda r, rs: r.path or "-")]


LEGEND = {
    "step": "step ms: median over blocks of the time per `step()` (CUDA events from the launch of a block's first "
            "step to the end of its last, over the steps after the first; wall time on CPU); spread: "
            "fastest–slowest block; host ms: wall time of the `step()` call itself; × fused: median over "
            "`fused=True`'s; first 4 calls: a step that creates its state in its first call is captured in its "
            "second.",
    "iteration": "iteration ms: median over blocks of a whole training iteration (forward, backward, tail, "
                 "scheduler); tail host ms: host time from after `backward()` to the tail's return (clip, step, "
                 "zero_grad; no synchronize); matches eager: |params - eager's| / |eager's params - initial| "
                 "(rel) and the largest element's difference (max) after the first 4 iterations (the warm-up, on the "
                 "same batches in every method).",
}


def markdown(results: list[Result], run: dict[str, Any]) -> str:
    title = (f"optcapture.bench: {run['optimizer']} on {run['device_name']} (torch {run['torch']}, {run['date']})")
    if run.get("bandwidth_gbs"):
        title += f", copy bandwidth {run['bandwidth_gbs']:.0f} GB/s"
    if run.get("blocks"):
        title += f"; {run['blocks']} blocks of {run.get('steps')} steps per method, methods interleaved"
    extra = [f"{key} {run[key]}" for key in ("threads", "amp", "compile_model", "ranks")
             if run.get(key) not in (None, False)]
    if extra:
        title += " (" + ", ".join(extra) + ")"
    lines = [title]
    for unit in ("step", "iteration"):
        rows = [r for r in results if r.unit == unit]
        if not rows:
            continue
        columns = _columns(unit)  # type: ignore[arg-type]
        lines += ["", "| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r, rows) for _, cell in columns) + " |" for r in rows]
        lines += ["", LEGEND[unit]]
    floors = {r.preset: r.floor_ms for r in results if r.floor_ms > 0}
    if floors:
        lines += ["", "floor (bytes the step must move / copy bandwidth): "
                  + ", ".join(f"{preset} {floor:.3f} ms" for preset, floor in floors.items())]
    notes = [f"- {line}" for line in run.get("notes", [])]
    notes += [f"- {r.preset} {r.method}: {r.note}" for r in results if r.note]
    reports = [f"{r.preset} {r.method}:\n" + "\n".join("  " + line for line in r.details.splitlines())
               for r in results if r.details]
    if notes:
        lines += ["", *notes]
    if reports:
        lines += ["", "optcapture.explain() of each optcapture method:", "```", *reports, "```"]
    return "\n".join(lines)


def load(folders: list[Path]) -> tuple[dict[str, Any], list[Result]]:
    """Results of earlier runs (their results.json), in order; the header of the first, with its bandwidth, and the
    notes of all."""
    run: dict[str, Any] = {}
    results: list[Result] = []
    fields = {f.name for f in dataclasses.fields(Result)}
    notes: list[str] = []
    for folder in folders:
        payload = json.loads((folder / "results.json").read_text())
        run = run or dict(payload["header"])
        notes += payload["header"].get("notes", [])
        results += [Result(**{k: v for k, v in row.items() if k in fields}) for row in payload["results"]]
    run["notes"] = notes
    return run, results


def write(out: Path, results: list[Result], run: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"header": run, "results": [dataclasses.asdict(r) | {"of_floor": r.of_floor} for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(table + "\n")
    try:
        chart(out / "chart.png", results, run)
    except ImportError:
        print("matplotlib is not installed (pip install 'optcapture[bench]'): chart.png not written")


HIGHLIGHT, OTHER = "#dd8452", "#8c8c8c"


def chart(path: Path, results: list[Result], run: dict[str, Any]) -> None:
    """Per preset: median time per step (bars from the fastest to the slowest block) beside the first call's time;
    optcapture's methods highlighted, values written on the bars, plain (linear) time axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r.preset for r in results))
    heights = [max(1.6, 0.45 * sum(r.preset == p for r in results) + 0.9) for p in presets]
    fig, axes = plt.subplots(len(presets), 2, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]})
    for (timed, first), preset in zip(axes, presets, strict=True):
        rows = [r for r in results if r.preset == preset]
        labels = [r.method for r in rows]
        colors = [HIGHLIGHT if r.method.startswith("optcapture") else OTHER for r in rows]
        medians = [r.step_ms for r in rows]
        low = [r.step_ms - r.step_spread[0] for r in rows]
        high = [r.step_spread[1] - r.step_ms for r in rows]
        bars = timed.barh(labels, medians, xerr=[low, high], color=colors, capsize=3)
        timed.bar_label(bars, labels=[f"{m:.3f}" for m in medians], padding=4, fontsize=8)
        unit = "iteration" if rows[0].unit == "iteration" else "step"
        timed.scatter([r.host_ms for r in rows], labels, marker="D", s=16, color="black", zorder=3,
                      label="tail host ms" if unit == "iteration" else "host ms per call")
        if rows[0].floor_ms > 0:
            timed.axvline(rows[0].floor_ms, color="#c44e52", linestyle="--", label=f"floor {rows[0].floor_ms:.3f} ms")
        timed.legend(loc="lower right", fontsize=8)
        timed.set_title(f"{preset}: ms per {unit} (median, bar: fastest–slowest block)", fontsize=10)
        timed.set_xlabel(f"ms per {unit} (lower is better)")
        timed.invert_yaxis()
        timed.margins(x=0.2)
        first_bars = first.barh(labels, [r.first_call_s for r in rows], color=colors)
        first.bar_label(first_bars, labels=[f"{r.first_call_s:.1f}" for r in rows], padding=4, fontsize=8)
        first.set_title(f"{preset}: first call (s)", fontsize=10)
        first.set_xlabel("seconds (lower is better)")
        first.invert_yaxis()
        first.tick_params(labelleft=False)
        first.margins(x=0.25)
    fig.suptitle(f"{run['optimizer']} on {run['device_name']}, torch {run['torch']} ({run['date']}); "
                 "optcapture highlighted", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
