"""Graph transforms. Each takes a ``base.Context`` and returns a ``base.PassResult``: how many
rewrites fired and what it found (``info``)."""
from .base import Context, PassResult
from .drop import drop_unread
from .follow import follow_side_tensors
from .merge import MergeSite, splice_merge
from .pooling import weight_pooling
from .shapes import repair_shapes
from .size_bias import add_size_bias

__all__ = ["Context", "PassResult", "MergeSite", "splice_merge", "follow_side_tensors",
           "repair_shapes", "drop_unread", "add_size_bias", "weight_pooling"]
