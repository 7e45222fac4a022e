# Two entry points: `make demo` and `make test`. Both create .venv and install jaxpar on first use.
# The demo and benchmarks run on 8 simulated CPU devices unless JAX_PLATFORMS says otherwise.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CPU8 := XLA_FLAGS="--xla_force_host_platform_device_count=8 $(XLA_FLAGS)" JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu}

.PHONY: demo test test-slow bench bench-train bench-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(CPU8) $(BIN)/python -m jaxpar.train configs/demo.yaml

bench: $(STAMP)
	$(BIN)/python scripts/bench_attention.py --quick

bench-train: $(STAMP)
	$(CPU8) $(BIN)/python scripts/bench_train.py

bench-data: $(STAMP)
	$(CPU8) $(BIN)/python scripts/bench_data.py

# One pytest process. (A whole-suite process once deadlocked in a collective; the cause was
# XLA:CPU's concurrency-optimized scheduler, which jaxpar now turns off on import.)
test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache
