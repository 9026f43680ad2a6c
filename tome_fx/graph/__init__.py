"""Reading and running fx graphs: op recognition (``nodes``), runs on example inputs (``run``),
def-use walks (``walk``), what surrounds an attention (``terms``: the terms of a logits sum, a
window partition), and the merge-node contract (``merges``). One flat namespace."""
from .merges import is_merge, merge_arg, merge_nodes, merges_at, set_merge_arg, takes_arg
from .nodes import *  # noqa: F401,F403 - the op tables and recognisers (nodes.__all__)
from .run import (ShapeRecorder, ValueRecorder, data_dependent, has_tensor, is_tensor_shape,
                  overriding, placeholder_values, record_shapes, record_values, run_interpreter,
                  token_dims)
from .terms import addends, window_partition
from .walk import ancestors, ancestors_within, between, chains, descendants, fixed_lead
