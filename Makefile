# Two commands do all set-up: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: a CPU wheel lies on disk; never let a resolver pull a CUDA build.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,scale,models,bench]'
	$(PY) -m pip install -q -c constraints.txt --no-deps 'dynamic-network-architectures>=0.3' \
		'icon-registration==1.1.9' 'unigradicon==1.0.6'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lesiontrack --log-level INFO demo $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The gates .ci/run runs before the tests (configuration in pyproject.toml; also .pre-commit-config.yaml).
lint: $(STAMP)
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

bench: $(STAMP)
	$(PY) bench/registration.py

clean:
	rm -rf $(VENV) build *.egg-info
