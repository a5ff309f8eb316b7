"""Errors and the once-per-reason warning channel.

Invariant: a fallback is never silent. Each distinct reason is warned once per process
(and logged every time under ``TORCH_LOGS="optcapture"``); ``fallback="raise"`` turns it into
:class:`UnsupportedStepError` instead.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import warnings

import torch

log = logging.getLogger(__name__)

_warned: set[str] = set()


class CaptureError(RuntimeError):
    """optcapture could not capture a step it was asked to capture."""


class FloatsSpecialized(CaptureError):
    """Numbers of the param groups that change between steps (a scheduler cycles them) reach the step where Dynamo
    can only use a fixed number (``add(x, y, alpha=momentum)``, SGD with Nesterov): the bucketed step would compile
    again at every change. ``keys``: the param-group keys."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__(f"Dynamo keeps {list(keys)} constants of the compiled step: a new value compiles it again")
        self.keys = keys


class UnsupportedStepError(CaptureError):
    """The step uses something optcapture does not capture (and ``fallback="raise"`` was set)."""


class OptionError(CaptureError, TypeError, ValueError):
    """An option optcapture does not know, or a value it cannot take. Raised at the first call of the compiled
    step, before any of it runs (``torch.compile`` hands a backend its options only then)."""


# Frames a warning must not point at: optcapture's, torch's (Dynamo's, between the user's call and the backend) and
# the standard library's. The first frame outside them is the user's line that called the compiled step.
_NOT_USER = tuple(os.path.dirname(path) + os.sep for path in (__file__, torch.__file__)) + (
    sysconfig.get_paths()["stdlib"] + os.sep, "<")


def user_stacklevel() -> int:
    """The ``stacklevel`` at which ``warnings.warn``, called by the caller of this function, names the user's line."""
    frame = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_USER):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level if frame is not None else 2


def warn_once(reason: str, key: str | None = None) -> None:
    """Warn about ``reason`` the first time it is seen in this process, at the user's line; always log it. ``key``:
    what several warnings share (another warning's text, or a name of its own): once one of them was said, the
    others are not."""
    log.info("fallback: %s", reason)
    message = f"optcapture: {reason}"
    if message not in _warned and key not in _warned:
        _warned.update({message} if key is None else {message, key})
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def clear_warnings() -> None:
    _warned.clear()
