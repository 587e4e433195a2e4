# Every target installs what it needs into $(VENV) first, so each works on a fresh clone.
# torch is installed before the package: the package only asks for a range, so a CUDA build you already
# have is kept, and here `torch==2.13.0` is the local CPU build (a bare `torch` would fetch a CUDA build).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH ?= torch==2.13.0
COLA_SOURCE ?= https://nyu-mll.github.io/CoLA/cola_public_1.1.zip
MODEL ?= bert-base-uncased

.PHONY: install test test-lowest test-offline-install tutorial style quality

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[dev,postgres]"
	touch $@

install: $(VENV)/.installed

# Two pytest workers, one thread each: on 2 cores this beats one worker with two threads. Each xdist_group runs
# whole on one worker, in the order tests/conftest.py gives them (the long chains first; see its
# pytest_collection_modifyitems).
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

# setup.cfg's lower bounds, proven: a second environment (.venv-lowest) with every direct dependency at its bound
# runs the suite's `lowest` subset.
test-lowest:
	TORCH="$(TORCH)" bash .ci/lowest_versions.sh

# docs/cluster.md's install on a node without network: a wheelhouse for this machine, installed with the network cut
# into a fresh virtualenv whose site provides torch, transformers and accelerate (minutes: pip installs ~80 wheels).
test-offline-install: install
	SITE_VENV=$(VENV) bash .ci/offline_install.sh

# accelerate sets one thread per process on a CPU; a single CPU process should use every core.
tutorial: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(VENV)/bin/accelerate launch --config_file accelerate_config.yaml experiments/cola.py \
		experiments/recipes/tutorial.yaml --cola_source $(COLA_SOURCE) --model_name_or_path $(MODEL)

style: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
	$(VENV)/bin/nbstripout --keep-id notebooks/*.ipynb

# ruff lints and formats the notebooks too; nbstripout fails on a notebook committed with outputs or execution
# counts (--keep-id: the tests find cells by their ids).
quality: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports
	$(VENV)/bin/nbstripout --verify --keep-id notebooks/*.ipynb
