"""Errors raised by tome_fx. Each carries a one-line message naming the problem."""


class TomeError(Exception):
    """Base class for tome_fx errors."""


class CaptureError(TomeError, ValueError):
    """The model could not be captured as a graph (tracing failed)."""


class MergedError(TomeError, ValueError):
    """The model is already merged by tome_fx (a module ``optimize`` returned, or a file
    ``tome_fx.export`` wrote): merge the original model instead."""


class ShapeError(TomeError, ValueError):
    """A captured module was called with inputs of a shape it was not captured for."""


class NoAttentionError(TomeError, ValueError):
    """The model has no attention site that tome_fx can find."""


class ExportError(TomeError, ValueError):
    """A module cannot be exported (ONNX, ``.pt2``), or its exported file does not compute what
    the module computes."""


class MissingExtraError(TomeError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def one_line(exc: BaseException) -> str:
    """First line of an exception message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RewriteError(TomeError, RuntimeError):
    """The rewrite cannot make a graph safe (a method's rule let an unsafe site through)."""
