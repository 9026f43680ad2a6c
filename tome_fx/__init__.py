"""tome_fx: Token Merging (ToMe) as a torch.fx graph pass."""
from .api import explain, optimize, rewrite
from .capture import capture
from .compiling import compile
from .cost import plan
from .errors import CaptureError, NoAttentionError, ShapeError, TomeError
from .match import find_blocks
from .plans import BlockPlan, Plan
from .schedule import parse_r
from .track import track_sources

__all__ = [
    "optimize", "compile", "explain", "rewrite", "capture", "find_blocks", "parse_r", "plan", "Plan",
    "BlockPlan", "TomeError", "CaptureError", "NoAttentionError", "ShapeError", "track_sources",
]
__version__ = "0.1.0"
