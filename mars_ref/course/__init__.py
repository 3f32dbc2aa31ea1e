"""The course helpers the notebooks import: toy problems (``toys``), the gradient-variance probe (``variance``),
the exercise checks (``exercises``), the notebooks' claim checks (``claims``) and the figure style (``style``)."""
