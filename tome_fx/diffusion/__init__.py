"""Diffusers models: default example inputs from their config (``inputs``), and the result a
pipeline calls as it calls the original (``module``)."""
from .build import build_tomesd
from .inputs import default_inputs, is_diffusers
from .module import DiffusionModule, call_inputs

__all__ = ["default_inputs", "is_diffusers", "DiffusionModule", "call_inputs", "build_tomesd"]
