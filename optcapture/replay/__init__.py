"""Stage 5, replay: everything a captured optimizer step does while it runs (one package: :mod:`.step` runs a
capture, :mod:`.fallback` holds the give-up policy, :mod:`.counters` the counters).

The backend builds a :class:`CapturePlan` at compile time and hands it to :class:`CapturedStep`, the callable
Dynamo calls for every step; from then on this package alone runs the step. Per call it (1) checks that the
capture still describes the optimizer: the same storage under every param and state tensor, no per-param scalar
state (step counters) written outside the capture since its last step, no float it holds as a constant changed;
(2) binds the grads: on CUDA it points each run's grad table at the grads autograd left (a few bytes, only when a
grad moved), otherwise it copies every grad into its flat slot (``p.grad`` stays the user's tensor); (3) writes
changed hyperparameters into their device tensors; (4) runs the lowered step, which on CUDA replays one CUDA
graph. It owns what happens when that stops working: a rebuild when storage was replaced, the give-up policy
(a compile that failed before any of the step ran: the optimizer steps eagerly from then on, said once, or
:class:`~optcapture.UnsupportedStepError` under ``fallback="raise"``) and the process-wide counters.

Host cost: a call's Python work is a fixed number of operations per bucket, run and param group. What grows with
the tensor count runs inside single C-level calls over lists built at capture (``map`` of a C method, ``list
==``, ``torch._foreach_copy_``), never as Python code per tensor.

Invariant: the compiled step only ever runs on storage that every param, grad and state tensor of the capture
currently uses; when that stops being true the capture is rebuilt, never reused.
"""

from optcapture.replay.counters import COUNTERS, Path, Stats, count_graph, count_path, reset_counters
from optcapture.replay.fallback import eager_step, give_up, raising, stepping_eagerly
from optcapture.replay.step import CapturedStep, CaptureLog, CapturePlan

__all__ = ["COUNTERS", "CaptureLog", "CapturePlan", "CapturedStep", "Path", "Stats", "count_graph", "count_path",
           "eager_step", "give_up", "raising", "reset_counters", "stepping_eagerly"]
