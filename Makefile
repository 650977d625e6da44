# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
LOWEST := .venv-lowest

.PHONY: demo test test-lowest lint bench clean gpu-proof gpu-proof-dry

# the exact, tested set (constraints.txt); setup.cfg itself only declares ranges
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/simclr demo

# Two pytest-xdist workers for all but the SLURM tests (serially the suite took ~35 minutes on 2
# cores; the tests that build a module fixture go first, see tests/conftest.py), then the SLURM tests
# in one process: their clusters are module fixtures that must come up once each, one at a time.
# (Run beside the xdist workers they saved nothing: the two cores were busy, and both halves slowed.)
# The tests that compare timings across ranks (marked alone) run there too, with nothing beside them.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 -m 'not slurm and not alone' --durations=40
	$(PY) -m pytest -q -p no:xdist -m 'slurm or alone' --durations=8

# the lowest declared versions (constraints-lowest.txt), the whole suite but the SLURM clusters
test-lowest:
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q -c constraints-lowest.txt -e '.[dev]'
	$(LOWEST)/bin/python -c "import torch, torchvision, mlflow; print('torch', torch.__version__, 'torchvision', \
		torchvision.__version__, 'mlflow', mlflow.__version__)"
	$(LOWEST)/bin/python -m pytest -q -n 2 -m 'not slurm'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The GPU proof (README, "The GPU proof"): a GPU node's acceptance check, on the data in DATA
# (cifar10-jpeg/{train,test}, imagenette2-224-subset/train); `python3 -m benchmarks.gpu_proof` is the proof
gpu-proof: $(STAMP)
	$(PY) -m benchmarks.gpu_proof --data "$(DATA)"

# the same stages at tiny sizes on this CPU
gpu-proof-dry: $(STAMP)
	$(PY) -m benchmarks.gpu_proof --dry

clean:
	rm -rf runs demo_data mlflow.db mlartifacts .pytest_cache $(LOWEST)
