"""Tables and charts of benchmark results."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from optcapture.bench.measure import Result

TOLERANCE = 1e-4  # max |param - eager's| after the run for "ok" (fp32; steps of lr 1e-3)


def markdown(results: list[Result], header: dict[str, Any]) -> str:
    lines = [f"optcapture.bench: {header['optimizer']} on {header['device_name']} (torch {header['torch']}, "
             f"{header['date']}), copy bandwidth {header['bandwidth_gbs']:.0f} GB/s", "",
             "| preset | method | step ms | of floor | host ms | first call s | first 4 calls s | kernels/step "
             "| peak MB | matches eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        match = "reference" if r.max_abs_diff is None else (
            f"ok ({r.max_abs_diff:.1e})" if r.max_abs_diff <= TOLERANCE else f"NO ({r.max_abs_diff:.1e})")
        kernels = "-" if r.kernels is None else str(r.kernels)
        lines.append(f"| {r.preset} | {r.method} | {r.step_ms:.3f} | {r.of_floor:.2f} | {r.host_ms:.3f} | "
                     f"{r.first_call_s:.1f} | {r.warm_up_s:.1f} | {kernels} | {r.peak_mb:.0f} | {match} |")
    floors = {r.preset: r.floor_ms for r in results}
    lines.append("")
    lines.append("floor (bytes the step must move / copy bandwidth): "
                 + ", ".join(f"{preset} {floor:.3f} ms" for preset, floor in floors.items()))
    return "\n".join(lines)


def load(folders: list[Path]) -> tuple[dict[str, Any], list[Result]]:
    """Results of earlier runs (their results.json), in order; the header of the first, with its bandwidth."""
    header: dict[str, Any] = {}
    results: list[Result] = []
    for folder in folders:
        payload = json.loads((folder / "results.json").read_text())
        header = header or payload["header"]
        for row in payload["results"]:
            row.pop("of_floor", None)
            results.append(Result(**row))
    return header, results


def write(out: Path, results: list[Result], header: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"header": header, "results": [dataclasses.asdict(r) | {"of_floor": r.of_floor} for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(table + "\n")
    try:
        chart(out / "chart.png", results, header)
    except ImportError:
        print("matplotlib is not installed (pip install 'optcapture[bench]'): chart.png not written")


def chart(path: Path, results: list[Result], header: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r.preset for r in results))
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        rows = [r for r in results if r.preset == preset]
        ax.bar([r.method for r in rows], [r.step_ms for r in rows], color="#4c72b0")
        ax.axhline(rows[0].floor_ms, color="#c44e52", linestyle="--", label=f"floor {rows[0].floor_ms:.3f} ms")
        ax.set_yscale("log")
        ax.set_title(f"{preset}: step time (ms, log)")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.suptitle(f"{header['optimizer']} on {header['device_name']}, torch {header['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
