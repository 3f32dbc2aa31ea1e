"""Test-session settings shared by pytest and the notebook kernels it starts (nbval).

Kernels inherit this process's environment, so notebooks run in CI see the same: no
progress-bar widgets, the CPU only (unless ``MARS_REF_TEST_CUDA=1``), a fixed hash seed.
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
if os.environ.get("MARS_REF_TEST_CUDA") != "1":  # the GPU check (scripts/gpu_check.py) runs the CUDA cases
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
