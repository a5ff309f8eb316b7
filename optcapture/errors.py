"""Errors and the once-per-reason warning channel.

Invariant: a fallback is never silent. Each distinct reason is warned once per process
(and logged every time under ``TORCH_LOGS="optcapture"``); ``fallback="raise"`` turns it into
:class:`UnsupportedStepError` instead.
"""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)

_warned: set[str] = set()


class CaptureError(RuntimeError):
    """optcapture could not capture a step it was asked to capture."""


class UnsupportedStepError(CaptureError):
    """The step uses something optcapture does not capture (and ``fallback="raise"`` was set)."""


class OptionError(CaptureError, TypeError, ValueError):
    """An option optcapture does not know, or a value it cannot take. Raised at the first call of the compiled
    step, before any of it runs (``torch.compile`` hands a backend its options only then)."""


def warn_once(reason: str) -> None:
    """Warn about ``reason`` the first time it is seen in this process; always log it."""
    log.info("fallback: %s", reason)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"optcapture: {reason}", RuntimeWarning, stacklevel=3)


def clear_warnings() -> None:
    _warned.clear()
