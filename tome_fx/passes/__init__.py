"""Graph rewrites. Each pass takes a GraphModule and returns a PassResult."""
from .base import PassResult
from .drop import check_drop, drop_unread
from .merge import insert_merges
from .pooling import weight_pooling
from .prop_attn import add_size_bias
from .shapes import repair_shapes
from .token_flow import check_token_flow

__all__ = ["PassResult", "insert_merges", "add_size_bias", "weight_pooling", "check_token_flow",
           "repair_shapes", "drop_unread", "check_drop"]
