"""Silence while capture tries: torch.export prints partial graphs of a failed export (hundreds
of lines) and logs warnings; the one-line CaptureError says what failed."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet():
    """Inside: stderr goes nowhere, torch's loggers are off, warnings are ignored; all
    restored on exit."""
    loggers = [logging.getLogger("torch")] + [
        log for name, log in logging.Logger.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(log, logging.Logger)]
    before = [log.disabled for log in loggers]
    for log in loggers:
        log.disabled = True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, disabled in zip(loggers, before):
            log.disabled = disabled
