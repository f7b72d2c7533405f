# nvml-exporter — see README.md. Every target installs what it needs (apt as root, pip into .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FAKE   := build/fakenvml/libnvidia-ml.so.1
DEMO_STATE := build/demo/state.conf
DEMO_ADDRESS ?= :9400
CFLAGS_FAKE := -O2 -g -Wall -Wextra -Werror -std=c11 -fPIC -shared -fvisibility=hidden \
               -Wl,-soname,libnvidia-ml.so.1

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' exporter/__init__.py)
DEB := dist/prometheus-nvml-exporter_$(VERSION)_all.deb

.PHONY: deps venv fakenvml test lint demo docs deb bench bench-idle bench-fleet bench-early-warning gpu-carry clean

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
	$(BIN)/ruff check exporter tests dashboards bench rules
	$(BIN)/mypy

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

# The Debian package, built with Debian's own Python and tools (not pyenv's), from the tracked sources
# plus NVIDIA's pynvml.py, bundled privately (Debian's python3-pynvml would pull in a driver library).
deb: $(DEB)
# The vendored pynvml.py has no version of its own: a minimal dist-info of the nvidia-ml-py it comes
# from goes beside it, which importlib.metadata reads (nvml_exporter_build_info's pynvml_version).
$(DEB): deps venv $(shell git ls-files exporter packaging rules dashboards docs examples README.md LICENSE 2>/dev/null)
	rm -rf build/deb && mkdir -p build/deb/src/vendor dist
	tar -cf - --exclude=__pycache__ exporter rules dashboards docs examples packaging README.md LICENSE | \
		tar -xf - -C build/deb/src
	cp -r packaging/debian build/deb/src/debian
	cp "$$($(BIN)/python -c 'import pynvml; print(pynvml.__file__)')" build/deb/src/vendor/pynvml.py
	v=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("nvidia-ml-py"))') && \
		mkdir build/deb/src/vendor/nvidia_ml_py-$$v.dist-info && \
		printf 'Metadata-Version: 2.1\nName: nvidia-ml-py\nVersion: %s\n' "$$v" \
			> build/deb/src/vendor/nvidia_ml_py-$$v.dist-info/METADATA
	cd build/deb/src && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$$HOME LC_ALL=C.UTF-8 \
		dpkg-buildpackage -us -uc -b >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	mv build/deb/prometheus-nvml-exporter_$(VERSION)_all.deb dist/

# Figures against a tutorial-style exporter, nvitop-exporter (PyPI, in its own venv) and the C floor
# (bench/cref/cref.c: the exporter's NVML calls and page in C). Prints a table, writes bench/results.json.
# Not part of `make test`: timings belong to benchmarks, not to assertions. `make bench-idle`: only the
# idle-CPU figure (a minute).
CREF_SRC := bench/cref/cref.c
bench: venv fakenvml build/bench-venv/bin/nvitop-exporter build/cref/cref
	$(BIN)/python bench/run.py

build/bench-venv/bin/nvitop-exporter:
	$(PYTHON) -m venv build/bench-venv
	build/bench-venv/bin/pip install -q --disable-pip-version-check nvitop-exporter

bench-idle: venv fakenvml
	$(BIN)/python bench/run.py --idle

# The early-warning evaluation (docs/early-warning.md): 64 nodes x 8 GPUs x 7 days with injected
# degradations through the exporter's own model; a few minutes. Writes build/early-warning.json and prints
# the model's CPU per scrape. `make test` runs a small version of it (tests/test_early_warning.py).
bench-early-warning: venv
	mkdir -p build
	$(BIN)/python bench/early_warning.py > build/early-warning.json
	$(BIN)/python -c 'import json; r = json.load(open("build/early-warning.json")); \
		print(json.dumps({k: r[k] for k in ("healthy_gpu_days", "false_alarms_per_1000_gpu_days", "per_kind")}, indent=1))'
	$(BIN)/python bench/early_warning.py --cost

build/cref/cref: $(CREF_SRC) | deps
	mkdir -p build/cref
	$(CC) -O2 -Wall -Wextra -Werror -std=c11 -o $@ $(CREF_SRC) -ldl

# The rule pack and the exporter's page at fleet scale (issue 14): the demo node's page (plus NVLink faults)
# served for 1,250 nodes = 10,000 GPUs to Debian's Prometheus, then to vmagent + victoria-metrics + vmalert.
# Prints the figures against the goals, writes bench/fleet-results.json and the report in docs/performance.md.
# Heavy: ~7 GiB and ~15 minutes on 2 cores with the page before issue 14. BENCH_FLEET_ARGS: e.g.
# --nodes 125, --rules DIR, --page FILE, --label NAME (bench/fleet.py --help); --report reprints the JSON.
BENCH_FLEET_ARGS ?=
bench-fleet: deps venv fakenvml
	$(BIN)/python bench/fleet.py --doc docs/performance.md $(BENCH_FLEET_ARGS)

# What tests/gpu/run.sh needs on a GPU machine that has no network and may lack promtool or gcc:
# carry build/gpu-carry (device tool: carry=["build/gpu-carry"]).
gpu-carry: build/cref/cref deps
	mkdir -p build/gpu-carry
	cp build/cref/cref "$$(command -v promtool)" build/gpu-carry/

docs: venv
	$(BIN)/python -m nvml_exporter.metrics > docs/metrics.md
	$(BIN)/python -m nvml_exporter.xidcatalog > docs/xid-catalog.md
	$(BIN)/python dashboards/generate.py
	$(BIN)/python rules/generate.py

clean:
	rm -rf build dist $(VENV)
