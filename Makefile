# framecast — every target rests on `make setup` (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_LIBS := .framecast/kafka/libs
FMNIST := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup prereqs dataset browser rtsp-server demo test lint soak clean help chart-check peers

help:
	@echo "make setup  - .venv, pinned dependencies, Kafka broker jars, Fashion-MNIST"
	@echo "make demo   - run the main job (framecast demo: 8 cameras x 15 fps of 640x480 RGB scenes)"
	@echo "make test   - setup + the whole test suite"
	@echo "make lint   - ruff + mypy"

setup: prereqs $(STAMP) $(KAFKA_LIBS)/.resolved dataset browser rtsp-server peers

prereqs:
	@command -v $(PYTHON) >/dev/null || { echo "missing: $(PYTHON) (Python 3.11)"; exit 1; }
	@command -v java >/dev/null || { echo "missing: java (JDK 17+; Debian: apt-get install openjdk-17-jdk-headless)"; exit 1; }
	@command -v mvn >/dev/null || [ -f $(KAFKA_LIBS)/.resolved ] || { echo "missing: mvn (Maven; Debian: apt-get install maven)"; exit 1; }

$(STAMP): pyproject.toml requirements.lock
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==26.3
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	@touch $@

$(KAFKA_LIBS)/.resolved: cluster/kafka/pom.xml
	@mkdir -p $(KAFKA_LIBS)
	mvn -B -q -f cluster/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS) -DincludeScope=runtime
	@touch $@

# Fashion-MNIST comes from the Debian package; elsewhere set FRAMECAST_DATA_DIR.
dataset:
	@if [ -n "$$FRAMECAST_DATA_DIR" ] || [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ; \
	else echo "note: Fashion-MNIST not found; install dataset-fashion-mnist or set FRAMECAST_DATA_DIR"; fi

# Debian's chromium: the dashboard's browser test (Playwright drives it; it never downloads
# a browser) and the demo's screenshot of the dashboard.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) ; \
	else echo "note: /usr/bin/chromium not found; the dashboard's browser test is skipped (apt-get install chromium)"; fi

# Debian's GStreamer RTSP server (run by Debian's python3): the tests' real RTSP camera
# (tests/rtsp_server.py serving H.264/H.265 files; docs/camera-sources.md).
RTSP_PACKAGES := gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
rtsp-server:
	@if /usr/bin/python3 tests/rtsp_server.py --check 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing GStreamer's RTSP server"; \
	  (apt-get install -y -qq --no-install-recommends $(RTSP_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends $(RTSP_PACKAGES) >/dev/null)) ; \
	else echo "note: GStreamer's RTSP server not found; the RTSP camera tests are skipped (apt-get install $(RTSP_PACKAGES))"; fi

# The peer pipelines of `framecast bench peers`, each in its own venv from exact pins
# (peers/README.md): Quix Streams 3.28 needs older confluent-kafka and pydantic than framecast.
PEERS_VENV := .venv-peers
PEERS := quix bytewax
peers: $(foreach p,$(PEERS),$(PEERS_VENV)/$(p)/.installed)

$(PEERS_VENV)/%/.installed: peers/requirements-%.txt
	@[ -x $(PEERS_VENV)/$*/bin/python ] || $(PYTHON) -m venv $(PEERS_VENV)/$*
	$(PEERS_VENV)/$*/bin/python -m pip install -q --upgrade pip==26.3
	$(PEERS_VENV)/$*/bin/python -m pip install -q -r $<
	@touch $@

# The main job on camera-size frames through the shipped RGB model (models/scenes); the
# Fashion-MNIST demo is `framecast demo --preset fashion-mnist`.
demo: setup
	$(BIN)/framecast demo --preset scenes

test: setup chart-check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check cluster jobs serving streams tests peers
	$(BIN)/mypy

soak: setup
	$(BIN)/python -m pytest -m soak tests/reliability

clean:
	rm -rf $(VENV) $(PEERS_VENV) .framecast .pytest_cache .mypy_cache .ruff_cache

# Helm chart + KubeRay manifests, validated for real: helm lint, helm template for every
# values file, kubeconform -strict against Kubernetes + KubeRay + KEDA + Prometheus-operator
# schemas, then the policy tests over the rendered YAML and the `ray up` schema test.
# helm/kubeconform (go install) and the schemas are built once into $(TOOLS).
TOOLS := .framecast/tools
$(TOOLS)/.ready: cluster/k8s/tools.py
	@command -v go >/dev/null || { echo "missing: go (Go 1.22+; Debian: apt-get install golang)"; exit 1; }
	$(BIN)/python -m cluster.k8s.tools ensure
	@touch $@

chart-check: setup $(TOOLS)/.ready
	$(BIN)/python -m cluster.k8s.tools check
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_helm_chart.py tests/unit/test_cluster_configs.py
