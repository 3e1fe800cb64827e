# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - install into .venv, then run the quickstart end to end and print its report
#                 (about 45 s on 2 CPU cores once installed; machines and figures in the README)
#   make test   - install into .venv, then run the test suite (about 6 minutes on 2 idle CPU cores
#                 when last timed; see the README)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# test processes for make test / test-all (pytest-xdist; 0: the tests run in pytest's own process)
TEST_WORKERS ?= 2

.PHONY: install demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/sparsify run -c configs/quickstart.yaml
	$(BIN)/sparsify report -c configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist worksteal

test-all: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs/quickstart .pytest_cache
