"""tome_fx: Token Merging (ToMe) as a torch.fx graph pass.

The package reads in the order data flows through it (ARCHITECTURE.md): ``graph`` helpers,
``capture``, ``match``, ``kernels``, ``passes`` and ``checks``, the one ``pipeline``,
``rules``, ``cost``, ``methods`` (the plug-ins ``optimize(method=...)`` looks up), then ``api``,
``sweep`` and ``cli``.
"""
from .api import compile, explain, export, optimize, plan, rewrite
from .capture import capture
from .data import Data, DataError, load_data
from .diffusion.files import load_pt2
from .distributed import DistributedError
from .errors import (CaptureError, ExportError, MergedError, MissingExtraError, NoAttentionError,
                     ShapeError, TomeError)
from .match import find_blocks
from .methods import Method, get_method, method_names, register_method
from .plans import BlockPlan, Plan
from .schedule import parse_r
from .sweep import SweepResult, sweep
from .track import track_sources

__all__ = [
    "optimize", "compile", "explain", "rewrite", "capture", "find_blocks", "parse_r", "plan", "Plan",
    "BlockPlan", "TomeError", "CaptureError", "NoAttentionError", "ShapeError", "track_sources",
    "export", "ExportError", "MissingExtraError", "sweep", "SweepResult", "load_data", "Data",
    "DataError", "DistributedError", "load_pt2", "MergedError", "Method", "register_method",
    "get_method", "method_names",
]
__version__ = "0.1.0"
