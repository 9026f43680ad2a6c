"""Tensor functions the rewritten graphs call by name: ToMe's merge (``tome``), ToMato's
(``tomato``), and what both use (``tokens``: sizes, padding groups, bias, pooling)."""
