"""The claims a notebook makes, checked and printed as sentences.

A notebook measures something (losses, divergence counts, variance ratios), prints the numbers,
and then states what they show. The numbers are the same on every run on one machine, but their
last digits change between CPUs (other vector widths and BLAS kernels round differently, and
chaotic runs amplify it), so a cell that prints them cannot have its output compared across
machines. The *claims* do not change: :func:`check` prints each one with its verdict and fails
if any does not hold, so a cell ending with it gives the same printout on every machine where
the notebook is right, and nbval can compare it (``# NBVAL_CHECK_OUTPUT``).
"""

from __future__ import annotations


def check(claims: dict[str, bool]) -> None:
    """Print ``holds: <claim>`` or ``FAILS: <claim>`` for each claim; raise if any fails."""
    for claim, holds in claims.items():
        print(f"{'holds' if holds else 'FAILS'}: {claim}")
    failed = [claim for claim, holds in claims.items() if not holds]
    if failed:
        raise AssertionError("claims that do not hold: " + "; ".join(failed))
