"""Test-session settings shared by pytest and the notebook kernels it starts (nbval).

Kernels inherit this process's environment, so notebooks run in CI see the same: no
progress-bar widgets, the CPU only, a fixed hash seed.
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
