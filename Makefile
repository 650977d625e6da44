# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
LOWEST := .venv-lowest

.PHONY: demo test test-lowest lint bench clean gpu-proof gpu-proof-dry gpu-proof-pack

# the exact, tested set (constraints.txt); setup.cfg itself only declares ranges
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/simclr demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# the lowest declared versions (constraints-lowest.txt), the whole suite but the SLURM clusters
test-lowest:
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q -c constraints-lowest.txt -e '.[dev]'
	$(LOWEST)/bin/python -c "import torch, torchvision, mlflow; print('torch', torch.__version__, 'torchvision', \
		torchvision.__version__, 'mlflow', mlflow.__version__)"
	$(LOWEST)/bin/python -m pytest -q -m 'not slurm'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The GPU proof (README, "The GPU proof"). On a lent GPU machine, whose image has torch and Python
# but not this project's environment: the carried wheels (.gpu_proof/wheels) fill in what is missing.
gpu-proof:
	if [ -d .gpu_proof/wheels ]; then $(PYTHON) -m pip install -q --no-index --find-links .gpu_proof/wheels \
		pyyaml tqdm; fi
	$(PYTHON) -m benchmarks.gpu_proof --data .gpu_data

# the same stages at tiny sizes on this CPU (CI runs it through tests/test_gpu_proof.py)
gpu-proof-dry: $(STAMP)
	$(PY) -m benchmarks.gpu_proof --dry

# run here before lending: the commit, the wheels the GPU image lacks, the two datasets (each in its own call)
gpu-proof-pack:
	mkdir -p .gpu_proof/wheels .gpu_data
	git rev-parse HEAD > .gpu_proof/commit
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
		-d .gpu_proof/wheels pyyaml tqdm
	cp -r ../shared/data/cifar10-jpeg ../shared/data/imagenette2-224-subset .gpu_data/
	grep -qxF '/.gpu_proof/' .git/info/exclude || echo '/.gpu_proof/' >> .git/info/exclude

clean:
	rm -rf runs demo_data mlflow.db mlartifacts .pytest_cache $(LOWEST)
