"""Diffusers models: default example inputs from their config (``inputs``), and the result a
pipeline calls as it calls the original (``module``)."""
from .inputs import default_inputs, is_diffusers
from .module import DiffusionModule

__all__ = ["default_inputs", "is_diffusers", "DiffusionModule"]
