# rlr-dist — developer entry points. Everything runs inside .venv.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled

.PHONY: setup test test-e2e test-multinode test-rgw bench demo demo-video clean

setup: $(STAMP)

# torch is pinned in the same pip command so a CUDA build is never pulled (docs: shared stack notes).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[test]"
	$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# Slower opt-in suites (not in `make test`): whole runs on a local Ray cluster, a minute or more each; a
# multi-node Ray cluster with the autoscaler and node loss; a real S3 server (Ceph RGW, needs apt-get download
# access to Debian packages the first time).
test-e2e: setup
	$(BIN)/python -m pytest -q -m e2e

test-multinode: setup
	$(BIN)/python -m pytest -q -m multinode

test-rgw: setup
	$(BIN)/python -m pytest -q -m rgw

bench: setup
	$(BIN)/rlr-dist bench estimators

# Fine-tune the shipped digits model toward "3" on a local Ray cluster (CPU), then print before/after scores.
demo: setup
	$(BIN)/rlr-dist train jobs/configs/digits.yaml

# Video: fine-tune the shipped moving-digits model (tiny Wan transformer) toward "a 3 moving right" (CPU, Ray).
demo-video: setup
	$(BIN)/rlr-dist train jobs/configs/moving-digits.yaml

clean:
	rm -rf $(VENV) .pytest_cache
