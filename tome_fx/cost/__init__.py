"""FLOPs as a closed form of the merge schedule (``model``, measured per node by ``flops``), the
budget search (``search``), calibration (``calibrate``), and ToMato's budget (``tomato``)."""
from .calibrate import Calibration, output_drift
from .model import BIG_R, CostModel
from .search import (STRATEGIES, TOLERANCE, best, candidates, check_budget, scored_candidates,
                     search, to_plan)

__all__ = ["BIG_R", "CostModel", "Calibration", "output_drift", "STRATEGIES", "TOLERANCE", "best",
           "candidates", "check_budget", "scored_candidates", "search", "to_plan"]
