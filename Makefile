# Two entry points a new user needs: `make demo` and `make test`.
# Each creates .venv on first use, installs the CPU torch wheel when no torch is present,
# then the project with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdcache-installed
DEMO_DIR ?= demo_out

.PHONY: setup demo test bench gpu-suite clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[build,server,triton,train,ray,s3,interop,trl,lightning,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out $(DEMO_DIR)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_build.py --quick
	$(PY) benchmarks/bench_read.py --quick
	$(PY) benchmarks/bench_loss.py --quick
	$(PY) benchmarks/step_overhead.py --quick
	$(PY) benchmarks/bench_server.py --quick

# On a CUDA machine (installs what it needs itself): make gpu-suite GPU_OUT=gpu_results
GPU_OUT ?= gpu_suite_out
gpu-suite:
	bash benchmarks/gpu_suite.sh $(GPU_OUT)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
