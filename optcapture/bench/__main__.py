"""Command line of the benchmark: ``python -m optcapture.bench --help``."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from optcapture.bench import measure, methods, presets, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optcapture.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--optimizer", default="adamw", choices=sorted(methods.BYTES_PER_PARAM))
    parser.add_argument("--preset", default=None, choices=[*presets.PRESETS, "all"],
                        help="parameter set (default: all; with --quick: small)")
    parser.add_argument("--methods", default=",".join(methods.METHODS), help="comma-separated subset of methods")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run takes well under a minute")
    parser.add_argument("--steps", type=int, default=None, help="timed steady steps (default 30, quick 5)")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json, results.md and chart.png")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="combine the results.json of earlier runs (e.g. one per preset) instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        header, merged = report.load(args.merge)
        table = report.markdown(merged, header)
        print(table)
        if args.out is not None:
            report.write(args.out, merged, header, table)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(methods.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(methods.METHODS)}")
    if "eager" not in chosen:
        chosen.insert(0, "eager")
    preset_names = [args.preset or ("small" if args.quick else "all")]
    if preset_names == ["all"]:
        preset_names = list(presets.PRESETS)
    steps = args.steps or (5 if args.quick else 30)

    bandwidth = measure.copy_bandwidth(device)
    header = {"optimizer": args.optimizer, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "bandwidth_gbs": bandwidth / 1e9, "quick": args.quick, "steps": steps}
    results = []
    for preset in preset_names:
        shapes = presets.shapes_for(preset, args.quick)
        floor_ms = methods.BYTES_PER_PARAM[args.optimizer] * presets.numel(shapes) / bandwidth * 1e3
        reference = None
        for method in chosen:
            result, final = measure.run(method, args.optimizer, preset, shapes, device, steps, floor_ms, reference)
            measure.release(device)
            if result is None:
                continue
            if method == "eager":
                reference = final
            results.append(result)
            print(f"  {preset:6s} {method:22s} {result.step_ms:9.3f} ms  first call {result.first_call_s:6.1f} s",
                  file=sys.stderr, flush=True)
    table = report.markdown(results, header)
    print(table)
    if args.out is not None:
        report.write(args.out, results, header, table)
    mismatched = [r for r in results if r.max_abs_diff is not None and r.max_abs_diff > report.TOLERANCE]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
