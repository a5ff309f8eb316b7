"""Command line of the benchmark: ``python -m optcapture.bench --help``.

Presets: ``gpt2``, ``small``, ``big`` (``all``: the three) time the optimizer step alone over fixed parameter sets;
``train-tiny`` and ``train-gpt2`` time whole training iterations of a nanoGPT-style model; ``scaling`` times the
step's host cost against the number of tensors; ``fsdp2`` times AdamW's step over a GPT-2 model under FSDP2's
``fully_shard`` (one rank; ``torchrun --nproc-per-node N -m optcapture.bench --preset fsdp2`` for N);
``--model pkg.module:factory`` times your own model's step. Every method runs in one process on its own copy, in
alternating blocks, and is checked against eager. On CPU every method runs on one intra-op thread unless
``--threads`` says otherwise: the README's CPU numbers are one thread's, and at a few dozen floats per tensor more
threads slow ``fused=True``'s many small kernels (2 threads on a 2-core host: 14.8 against 6.5 ms at 1000 x 64),
which would flatter a ratio against it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from optcapture.bench import fsdp2, measure, methods, presets, report
from optcapture.bench.compare import from_factory
from optcapture.bench.results import Result
from optcapture.bench.scaling import compare_scaling, default_numel, parse_counts
from optcapture.bench.training import Amp, compare_training

STEP_PRESETS = tuple(presets.PRESETS)
TRAINING_PRESETS = tuple(presets.TRAINING)
DEFAULT_STEPS = {"step": (30, 5), "training": (10, 3), "scaling": (20, 5), "model": (20, 5), "fsdp2": (20, 3)}
"""Steps per block (full, ``--quick``) of each kind of run."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optcapture.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--optimizer", default=None, choices=sorted(methods.BYTES_PER_PARAM),
                        help="step and scaling presets (default adamw), and --model where the factory returns no "
                             "optimizer (default AdamW(lr=1e-3, weight_decay=0.01))")
    parser.add_argument("--preset", default=None,
                        choices=[*STEP_PRESETS, "all", *TRAINING_PRESETS, "scaling", "fsdp2"],
                        help="default: all (with --quick: small)")
    parser.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                        help="time your own model's step: FACTORY() returns a model, (model, optimizer) or params")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset (eager always runs). Step presets and --model: "
                             f"{','.join(methods.METHODS)}; training: {','.join(methods.TRAIN_METHODS)}; "
                             f"scaling: {','.join(methods.SCALING_METHODS)}; fsdp2: {','.join(methods.FSDP2_METHODS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run takes well under a minute")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per method (default 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps (training: iterations) per block; default 30 step presets, 10 training, "
                             "20 scaling, fsdp2 and --model; 5, 3, 5, 3, 5 with --quick")
    parser.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                        help="training presets: autocast dtype (fp16 adds a GradScaler); default bf16 on CUDA, "
                             "none on CPU")
    parser.add_argument("--compile-model", action="store_true", help="training presets: torch.compile the model too")
    parser.add_argument("--counts", default=None,
                        help="scaling: comma-separated tensor counts (default 77,300,1000,3000; quick 8,32), each "
                             "COUNT or COUNTxNUMEL (floats per tensor; default 4096 on CUDA, 64 on CPU); stock "
                             "compile runs up to 300 tensors (quick 8) unless --methods names it")
    parser.add_argument("--isolated", action="store_true",
                        help="step presets: build and time one method at a time (automatic where copies for "
                             "every method do not fit in GPU memory)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: intra-op threads of every method (default 1; 0: torch's default for this host); "
                             "ignored on CUDA")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json, results.md and chart.png")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="combine the results.json of earlier runs (e.g. one per preset) instead of running")
    return parser


def _chosen(parser: argparse.ArgumentParser, given: str | None, allowed: tuple[str, ...]) -> list[str]:
    chosen = [m.strip() for m in (given or ",".join(allowed)).split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        parser.error(f"unknown methods {unknown} here; choose from {', '.join(allowed)}")
    return ["eager", *(m for m in chosen if m != "eager")]


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` on CPU (0: left as it is), restored after."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.merge:
        run, merged = report.load(args.merge)
        return _finish(merged, run, args.out)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.threads < 0:
        parser.error(f"--threads takes 0 (torch's default) or more, got {args.threads}")
    with _cpu_threads(device, args.threads):
        return _run(parser, args, device)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> int:
    if args.model is not None and args.preset is not None:
        parser.error("--model and --preset are exclusive")
    kind = ("model" if args.model else "training" if args.preset in TRAINING_PRESETS
            else args.preset if args.preset in ("scaling", "fsdp2") else "step")
    steps = args.steps or DEFAULT_STEPS[kind][1 if args.quick else 0]
    blocks = args.blocks

    if kind == "model":
        chosen = _chosen(parser, args.methods, methods.METHODS)
        comparison = from_factory(args.model, device, args.optimizer, methods=chosen, blocks=blocks, steps=steps,
                                  isolated=args.isolated)
        return _finish(comparison.results, comparison.header, args.out)
    if kind == "training":
        amp: Amp = args.amp or ("bf16" if device.type == "cuda" else "none")
        chosen = _chosen(parser, args.methods, methods.TRAIN_METHODS)
        training = presets.training_for(args.preset, args.quick)
        run = report.header(f"AdamW (2 groups, {training.model.tensors} tensors)", device, quick=args.quick,
                            blocks=blocks, steps=steps, amp=amp, compile_model=args.compile_model)
        results = compare_training(args.preset, training, chosen, device, blocks, steps, amp, args.compile_model,
                                   run["notes"])
        return _finish(results, run, args.out)

    if kind == "fsdp2":
        if args.optimizer not in (None, "adamw"):
            parser.error("--preset fsdp2 steps AdamW only")
        return _fsdp2(args, _chosen(parser, args.methods, methods.FSDP2_METHODS), steps)

    optimizer = args.optimizer or "adamw"
    bandwidth = measure.copy_bandwidth(device)
    run = report.header(optimizer, device, bandwidth_gbs=bandwidth / 1e9, quick=args.quick, blocks=blocks,
                        steps=steps)
    if kind == "scaling":
        chosen = _chosen(parser, args.methods, methods.SCALING_METHODS)
        scaling = presets.SCALING_QUICK if args.quick else presets.SCALING
        numel = default_numel(device)
        counts = parse_counts(args.counts, numel) if args.counts else [(c, numel) for c in scaling.counts]
        named = [m.strip() for m in (args.methods or "").split(",")]
        compile_limit = max(c for c, _ in counts) if "compile" in named else scaling.compile_limit
        results = compare_scaling(counts, optimizer, chosen, device, blocks, steps, bandwidth, compile_limit,
                                  run["notes"])
        return _finish(results, run, args.out)

    chosen = _chosen(parser, args.methods, methods.METHODS)
    preset_names = [args.preset or ("small" if args.quick else "all")]
    if preset_names == ["all"]:
        preset_names = list(STEP_PRESETS)
    results = []
    for preset in preset_names:
        shapes = presets.shapes_for(preset, args.quick)
        if optimizer in methods.MATRICES_ONLY:  # matrices, not the token embedding (GPT-2: 49 of 148 tensors)
            shapes = [s for s in shapes if len(s) == 2 and s != max(shapes, key=presets.numel_of)]
        numel = presets.numel(shapes)
        floor_ms = methods.BYTES_PER_PARAM[optimizer] * numel / bandwidth * 1e3
        isolated = args.isolated or not measure.fits_at_once(numel, len(chosen), device)
        if isolated and not args.isolated:
            measure.say(f"  {preset}: copies for {len(chosen)} methods do not fit in memory: one method at a time")
        make_copy, grads = measure.synthetic(shapes, optimizer, device)
        rows = measure.compare_steps(preset, make_copy, grads, chosen, device, blocks, steps, floor_ms, isolated,
                                     notes=run["notes"])
        if isolated:
            why = "--isolated" if args.isolated else "copies for every method do not fit in memory"
            for row in rows:
                row.note = f"timed alone ({why}): its blocks ran one after another, not between other methods'"
        results += rows
        del make_copy, grads
        measure.release(device)
    return _finish(results, run, args.out)


def _fsdp2(args: argparse.Namespace, chosen: list[str], steps: int) -> int:
    """The fsdp2 preset on this rank; rank 0 prints and writes, every rank returns the same exit status."""
    with fsdp2.process_group(args.device) as world:
        bandwidth = measure.copy_bandwidth(world.device)
        run = report.header("adamw", world.device, bandwidth_gbs=bandwidth / 1e9, quick=args.quick,
                            blocks=args.blocks, steps=steps, ranks=world.size)
        label = "fsdp2" if world.size == 1 else f"fsdp2-{world.size}ranks"
        preset = presets.sharded_for(world.device.type, args.quick)
        results = fsdp2.compare_fsdp2(label, preset, chosen, world, args.blocks, steps, bandwidth, run["notes"])
        if world.rank == 0:
            return _finish(results, run, args.out)
        return 1 if any(r.matches is False for r in results) else 0


def _finish(results: list[Result], run: dict[str, Any], out: Path | None) -> int:
    """Print the table, write it where asked; exit status 1 if some method's params disagree with eager's."""
    table = report.markdown(results, run)
    print(table)
    if out is not None:
        report.write(out, results, run, table)
    return 1 if any(r.matches is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
