# Tile-Aware MoE Accelerators: the two commands are `make lab` and `make test`.
# Every target makes or updates the environment first (quick when nothing changed).
#
# Settings (make VAR=value):
#   PYTHON             the Python that makes the environment (default python3, 3.10 or newer)
#   VENV               where the environment lives (default .venv)
#   USE_CURRENT_PYTHON 1: install into PYTHON itself, no venv (a GPU image that has torch and CuPy)
#   WHEELHOUSE         install from this folder of wheels alone (a machine with no internet)
#   CUDA_MAJOR         12, 13 or none: which set (default: read from nvidia-smi; none: the CPU set)
#   WHEEL_PYTHON, WHEEL_TARGET, WHEEL_VARIANT, WHEEL_SKIP   what `make wheelhouse` downloads for
#   LOCK_ARGS          options of tools/make_locks.py for `make locks` (e.g. --torch-cpu-wheels DIR)
#   LAB_PORT, LAB_IP   where `make lab` listens (default 8888 on 127.0.0.1)
#   CHROMIUM           the browser `make test-browser` drives (default /usr/bin/chromium)
#   EX                 which exercises `make grade` runs: EX=03, EX="01 04" (default: all)
#   VERBOSE            1: `make grade` prints the traceback of every failure

PYTHON ?= python3
VENV ?= .venv
LAB_PORT ?= 8888
LAB_IP ?= 127.0.0.1
WHEEL_PYTHON ?= 3.12
WHEEL_TARGET ?= linux-x86_64
WHEEL_VARIANT ?= cuda13
WHEEL_SKIP ?=
LOCK_ARGS ?=
PYTEST_ARGS ?=

ifeq ($(USE_CURRENT_PYTHON),1)
PY := $(PYTHON)
SETUP_FLAGS := --current-python
else
PY := $(VENV)/bin/python
SETUP_FLAGS := --venv $(VENV)
endif
ifneq ($(WHEELHOUSE),)
SETUP_FLAGS += --wheelhouse $(WHEELHOUSE)
endif

NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900

.PHONY: help setup setup-lab lab test test-browser grade bench sanitize exercises update book wheelhouse locks clean

help:
	@echo "make lab         set up, then open JupyterLab on the course"
	@echo "make test        set up, then check everything (helpers, kernels, notebooks, solutions)"
	@echo "make test-browser  run chapters in JupyterLab in headless Chromium (installs chromium, playwright)"
	@echo "make grade       run your exercises and say, part by part, what passes (EX=03: one; VERBOSE=1)"
	@echo "make bench       measure this GPU's ceilings and record them in benchmarks/results/"
	@echo "make sanitize    every kernel under compute-sanitizer (memcheck, racecheck, synccheck, initcheck; GPU only)"
	@echo "                 EX=03 or EX=06: your own kernel of that exercise instead"
	@echo "make exercises   regenerate exercises/ from solutions/ (never overwrites your work)"
	@echo "make update      take the course's new version (git pull) without losing your work"
	@echo "make book        the course as a static site in book/site/ (chapters with outputs, kernels, records)"
	@echo "make wheelhouse  download wheels for a GPU machine with no internet (WHEEL_PYTHON, WHEEL_SKIP)"
	@echo "make locks       regenerate requirements/locks/ with uv after changing requirements/ (needs internet)"
	@echo "make clean       remove the environment and caches (not your exercises, not results)"

setup:
	@$(PYTHON) tools/setup_env.py $(SETUP_FLAGS)

setup-lab:
	@$(PYTHON) tools/setup_env.py $(SETUP_FLAGS) --lab

# The JupyterLab server, as `make lab` starts it (`make test-browser` starts it through `make lab`).
# Loopback only; the token is new at each start unless JUPYTER_TOKEN is set. A busy port is an
# error (port_retries=0), never a silent move to a port other than the one printed and forwarded.
# As root (containers, cloud GPU machines) JupyterLab refuses to start without --allow-root.
LAB_FLAGS = --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.port_retries=0 \
	--ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks/00_setup.ipynb \
	$(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup-lab
	@echo ""
	@echo "JupyterLab is starting on http://$(LAB_IP):$(LAB_PORT)/lab (the address with its token follows)."
	@echo "On a remote machine, forward the port first:  ssh -L $(LAB_PORT):$(LAB_IP):$(LAB_PORT) you@that-machine"
	@echo "Port taken? make lab LAB_PORT=8890.  Stop it with Ctrl-C (twice), or File > Shut Down in JupyterLab."
	@echo ""
	$(PY) -m jupyterlab $(LAB_FLAGS)

# The course, not the learner: ruff skips exercises/ (pyproject.toml), and tests/test_exercises.py
# leaves out exercises with uncommitted changes.
test: setup
	$(PY) -m ruff check
	$(PY) -m pytest -rs $(NBVAL) tests $(wildcard notebooks/*.ipynb solutions/*.ipynb) $(PYTEST_ARGS)

# The course in a real browser: installs chromium (apt, needs root or sudo) and Playwright, then
# tests/browser starts `make lab`, runs chapters in headless Chromium, and stops the server
# (also on failure or SIGTERM: `exec` makes make's SIGTERM reach pytest). Screenshots: .browser-test/
CHROMIUM ?= /usr/bin/chromium

test-browser: setup-lab
	@CHROMIUM=$(CHROMIUM) bash tools/install_browser.sh
	@$(PY) -m pip install --disable-pip-version-check -q $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE)) \
		-r requirements/browser.txt
	COURSE_BROWSER_TEST=1 CHROMIUM=$(CHROMIUM) exec $(PY) -m pytest -rs tests/browser $(PYTEST_ARGS)

# One table per exercise (tools/grade.py, on nbval); exits 1 only when a part you attempted failed.
grade: setup
	@$(PY) tools/grade.py $(EX) $(if $(filter-out 0,$(VERBOSE)),--verbose)

bench: setup
	$(PY) benchmarks/ceilings.py

sanitize: setup
	$(PY) tools/sanitize.py $(if $(EX),--exercise $(EX))

exercises: setup
	$(PY) tools/make_exercises.py

# The new version file by file (tools/update.py says what it did with each), then the environment
# catches up with the new version's requirements.
update: setup
	@$(PY) tools/update.py
	@$(MAKE) --no-print-directory setup

# The course as a static site (tools/book.py): chapters from their executed copies in
# book/executed/ (a chapter with none is executed here first, into book/build/), kernels, records.
book: setup
	@$(PY) -m pip install --disable-pip-version-check -q $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE)) \
		-r requirements/book.txt
	$(PY) tools/book.py build

wheelhouse:
	$(PYTHON) tools/setup_env.py --download wheelhouse --python-version $(WHEEL_PYTHON) --lab \
		--target $(WHEEL_TARGET) --variant $(WHEEL_VARIANT) $(if $(WHEEL_SKIP),--skip $(WHEEL_SKIP))

# The locks of requirements/locks/ from their .in files: uv resolves each for every platform and
# Python it is for (tools/make_locks.py says how); tests/test_locks.py fails while one is stale.
locks: setup
	@$(PY) -m pip install --disable-pip-version-check -q "uv>=0.9"
	$(PY) tools/make_locks.py $(LOCK_ARGS)

clean:
	rm -rf $(VENV) .setup .pytest_cache .ipynb_checkpoints */.ipynb_checkpoints .browser-test book/build book/site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
