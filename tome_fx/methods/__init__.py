"""Merging methods as plug-ins: ``optimize(model, method=NAME, **options)`` looks ``NAME`` up
here (``registry``) and hands the call to it. Each module registers one method; its docstring
lists the method's own options. A third-party method is a ``Method`` subclass passed to
``register_method``, with no edit of ``api`` or ``pipeline``."""
from . import todo, tomato, tome, tomesd  # noqa: F401  (registers the built-in methods)
from .common import calibration_inputs, check_calibration, check_model, unmet_budget
from .registry import (DEFAULT_METHOD, Method, OptimizeCall, get_method, method_names,
                       register_method)
from .tome import plan_for_budget, rewrite_for_budget, rewrite_planned, rewrite_schedule, schedule_of

__all__ = ["Method", "OptimizeCall", "register_method", "get_method", "method_names",
           "DEFAULT_METHOD", "calibration_inputs", "check_calibration", "check_model",
           "unmet_budget", "plan_for_budget", "rewrite_for_budget", "rewrite_planned",
           "rewrite_schedule", "schedule_of"]
