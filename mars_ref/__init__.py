"""mars_ref: a readable, tested reference implementation of MARS (arXiv 2411.10438)."""

from . import chain, functional, pieces
from .baselines import Lion, Muon
from .optimizer import MARS

__all__ = ["MARS", "Lion", "Muon", "chain", "functional", "pieces"]
__version__ = "0.1.0"
