"""Analyses of a rewritten graph that return reasons instead of changing it: the token-flow
check (every consumer of merged tokens), the token-dimension probe, the drop check."""
from .drop import check_drop
from .token_flow import Flow, Pool, check_token_flow
from .token_probe import probe_block

__all__ = ["check_drop", "check_token_flow", "Flow", "Pool", "probe_block"]
