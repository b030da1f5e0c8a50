# Set-up and everyday commands. Each target creates the virtual environment (.venv) when it is missing,
# installing the tested set pinned in constraints.txt and prunebench itself in editable mode.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prunebench-installed
PYTEST_ARGS ?=

.PHONY: venv test test-unit test-slow lint format demo bench clean help

help:
	@echo "make test       the suite CI runs: unit + integration tests (creates .venv when missing)"
	@echo "make test-unit  the fast inner loop: unit tests only (-m unit)"
	@echo "make lint       ruff check and ruff format --check (what CI enforces)"
	@echo "make format     ruff format and ruff check --fix"
	@echo "make demo       run recipes/quickstart.yaml offline and write reports/quickstart"
	@echo "make test-slow  the long end-to-end tests (real CIFAR-10 subset)"
	@echo "make bench      prunebench bench -> reports/perf"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,scale]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/prunebench run recipes/quickstart.yaml
	$(BIN)/prunebench compare --experiment quickstart --out reports/quickstart

bench: $(STAMP)
	$(BIN)/prunebench bench --out reports/perf

clean:
	rm -rf build dist *.egg-info .pytest_cache
