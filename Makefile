# lazymount: `make demo` runs the main job, `make test` runs every test; both set up what they need.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
APT_PACKAGES := python3-venv fuse3 libfuse2 containerd runc skopeo umoci docker-registry \
    stargz-snapshotter debootstrap bubblewrap golang-go golang-github-containerd-stargz-snapshotter-dev \
    curl xz-utils busybox-static binutils pigz
APT_STAMP := $(VENV)/.apt-done
PIP_STAMP := $(VENV)/.pip-done

.PHONY: setup apt venv test lint demo bench clean

setup: apt venv

apt: $(APT_STAMP)
$(APT_STAMP):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "installing Debian packages:" $$missing; \
	        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	    else \
	        echo "missing Debian packages (ask an admin, or run as root): $$missing" >&2; \
	        echo "tests that need them are skipped with the reason printed" >&2; \
	    fi; \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(PIP_STAMP)
$(PIP_STAMP): setup.cfg pyproject.toml | $(APT_STAMP)
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_layering.py

test: setup lint
	$(VENV)/bin/python -m pytest tests

demo: setup
	$(VENV)/bin/python demo.py

bench: setup
	$(VENV)/bin/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
