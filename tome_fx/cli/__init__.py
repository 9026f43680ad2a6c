"""``tome-fx`` command line (``main``): model sources, report, bench, visualize."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
