# nvml-exporter — see README.md. Every target installs what it needs (apt as root, pip into .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FAKE   := build/fakenvml/libnvidia-ml.so.1
DEMO_STATE := build/demo/state.conf
DEMO_ADDRESS ?= :9400
CFLAGS_FAKE := -O2 -g -Wall -Wextra -Werror -std=c11 -fPIC -shared -fvisibility=hidden \
               -Wl,-soname,libnvidia-ml.so.1

.PHONY: deps venv fakenvml test lint demo docs clean

deps:
	@tools/install-deps

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,systemd]'
	touch $@

fakenvml: $(FAKE)
$(FAKE): tests/fakenvml/fakenvml.c | deps
	mkdir -p $(dir $@)
	$(CC) $(CFLAGS_FAKE) -o $@ $< -lpthread

lint: venv
	$(BIN)/ruff check exporter tests dashboards

test: deps venv fakenvml lint
	$(BIN)/python -m pytest -q

# The exporter on :9400 over 8 simulated H100s. Edit $(DEMO_STATE) while it runs: it sees the change.
demo: deps venv fakenvml
	mkdir -p $(dir $(DEMO_STATE))
	cp tests/fakenvml/scenarios/h100x8.conf $(DEMO_STATE)
	: > $(DEMO_STATE).events
	@echo "demo: 8 simulated H100 GPUs on $(DEMO_ADDRESS); try: curl localhost:9400/metrics"
	LD_LIBRARY_PATH=$(CURDIR)/build/fakenvml FAKE_NVML_STATE=$(CURDIR)/$(DEMO_STATE) \
		$(BIN)/nvml-exporter --web.listen-address=$(DEMO_ADDRESS)

docs: venv
	$(BIN)/python -m nvml_exporter.metrics > docs/metrics.md
	$(BIN)/python -m nvml_exporter.xid > docs/xid-catalog.md
	$(BIN)/python dashboards/generate.py

clean:
	rm -rf build dist $(VENV)
