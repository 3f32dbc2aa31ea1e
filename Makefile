# make demo  : train the default CPU model with MARS-AdamW (installs what is missing first)
# make test  : run the whole test suite, notebooks included (installs what is missing first)
# make notebooks : re-execute every notebook in place, so committed outputs match the code
# make figures : export every notebook's key figures as SVG and 150-dpi PNG (16:9) into notebooks/figures/
# make book : the course site from the committed notebooks (build/book/html; Sphinx, MathJax served with it)
# make slides : the two lectures as reveal.js decks with speaker notes (build/slides), viewable offline
# make student : the student edition, without the exercise solutions (build/student/mars_ref)
PYTHON ?= python3
VENV ?= .venv
# A CPU-only machine should pin the CPU build, e.g. `make test TORCH=torch==2.13.0`
# (or install torch from https://download.pytorch.org/whl/cpu first): an unpinned torch
# from PyPI is a multi-GB CUDA build.
TORCH ?= torch>=2.4
PY := $(VENV)/bin/python

.PHONY: install test demo notebooks figures lint bench reproduce book slides student gpu-check
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m mars_ref.gpt.train --overwrite

notebooks: install
	$(PY) scripts/run_notebooks.py

figures: install
	$(PY) scripts/run_notebooks.py --figures notebooks/figures

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/step_time.py

reproduce: install
	$(PY) benchmarks/reproduce.py --quick

book: install
	$(PY) -c "import sphinx, myst_nb, sphinx_book_theme, selenium" 2>/dev/null || \
		$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,course]"
	$(PY) scripts/course.py book

slides: install
	$(PY) scripts/course.py slides

student: install
	$(PY) scripts/course.py student

# make gpu-check : on a machine with a GPU, check every GPU path in at most 10 minutes (a CPU dry run without CUDA);
# the table goes to benchmarks/results/ (docs/gpu.md). Options: make gpu-check GPU_CHECK_ARGS="--budget 900"
gpu-check: install
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)
