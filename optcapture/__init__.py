"""optcapture: the fastest dependable optimizer step, as a ``torch.compile`` backend.

``step = torch.compile(opt.step, backend="optcapture")`` needs no import: the package registers
itself in the ``torch_dynamo_backends`` entry-point group. Importing it has no side effects.
"""

from optcapture._compat import check_torch_version as _check_torch_version

_check_torch_version()

from optcapture.backend import optcapture_backend  # noqa: E402
from optcapture.config import CaptureConfig  # noqa: E402
from optcapture.errors import CaptureError, OptionError, UnsupportedStepError  # noqa: E402
from optcapture.registry import CaptureReport, explain, reset, stats  # noqa: E402
from optcapture.replay import Stats  # noqa: E402
from optcapture.wrapping import capture  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CaptureConfig",
    "CaptureError",
    "CaptureReport",
    "OptionError",
    "Stats",
    "UnsupportedStepError",
    "__version__",
    "capture",
    "explain",
    "optcapture_backend",
    "reset",
    "stats",
]
