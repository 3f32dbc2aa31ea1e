"""mars_ref: a readable, tested reference implementation of MARS (arXiv 2411.10438).

``from mars_ref import MARS`` loads the optimizer core only: the optimizer (``optimizer``), its equations as pure
functions (``pieces``), the Lion and Muon baselines (``baselines``). The GPT application is ``mars_ref.gpt``, the
course helpers ``mars_ref.course``."""

from . import pieces
from .optimizer import MARS

__all__ = ["MARS", "Lion", "Muon", "pieces"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``Lion`` and ``Muon`` (the baselines) load when first asked for, so ``from mars_ref import MARS`` loads the
    optimizer alone."""
    if name in ("Lion", "Muon"):
        from . import baselines

        return getattr(baselines, name)
    raise AttributeError(f"module 'mars_ref' has no attribute {name!r}")
