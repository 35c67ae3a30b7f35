# The two commands of the README are `make demo` and `make test`; both set up first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
NP    ?= 2
METHOD ?= signum
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test test-unit test-multirank test-slurm lint bench clean

setup:                 ## MPI, .venv, Horovod (cached build), hvd_signsgd + native kernels, self-check
	bash native/setup_env.sh

demo: setup            ## 2-rank training on scikit-learn's digits with 1-bit compression
	$(VENV)/bin/horovodrun -np $(NP) -H localhost:$(NP) --mpi-args=--oversubscribe \
	    $(PY) examples/train_digits.py --method $(METHOD) --epochs 8

test: setup            ## lint, unit tests, multi-rank tests, Slurm tests
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q

test-unit:
	$(PY) -m pytest tests/unit -q

test-multirank:
	$(PY) -m pytest tests/multirank -q

test-slurm:            ## starts a real local Slurm cluster (root; installs slurm-wlm + munge)
	$(PY) -m pytest tests/slurm -q

lint:
	$(VENV)/bin/ruff check .

bench:                 ## kernel throughput table (see README)
	$(PY) examples/bench_kernels.py

clean:
	rm -rf build *.egg-info hvd_signsgd/*.so
