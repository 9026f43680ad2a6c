"""Per-block merge schedules from the forms the ToMe paper's code accepts."""
from __future__ import annotations

from numbers import Integral, Real


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def parse_r(r, num_blocks: int) -> list[int]:
    """``r`` as an int (same every block), a list (padded with 0) or ``(r, inflect)``.

    ``(r, inflect)`` is a linear ramp from ``r * (1 - inflect)`` to ``r * (1 + inflect)``, so
    ``(r, -1)`` goes from 2r down to 0 and keeps the same total as a constant r.
    """
    if isinstance(r, (list,)):
        values = [_check_int(v, f"r[{i}]") for i, v in enumerate(r)]
        if len(values) > num_blocks:
            raise ValueError(f"r has {len(values)} entries but the model has {num_blocks} blocks")
        return values + [0] * (num_blocks - len(values))
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"r as a tuple must be (r, inflect), got {len(r)} items")
        base = _check_int(r[0], "r")
        inflect = r[1]
        if isinstance(inflect, bool) or not isinstance(inflect, Real):
            raise TypeError(f"inflect must be a number, got {type(inflect).__name__}")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        if num_blocks == 1:
            return [max(lo, 0)]
        step = (hi - lo) / (num_blocks - 1)
        return [max(int(lo + step * i), 0) for i in range(num_blocks)]
    return [_check_int(r, "r")] * num_blocks
