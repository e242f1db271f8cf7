# mobykit: `make demo` runs the main job, `make test` sets up and runs every test.
# Both install what they need (Debian packages with apt, Python packages into .venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

# `mobykit pkg build` and the tests fetch guest pieces (kernel, busybox, runc) with `apt-get
# download`, so the package lists must exist even when every package below is installed.
# Debian packages the tests and the demo use: the local registry, qemu + a session libvirtd,
# guest pieces (busybox, cpio, depmod), ISO and disk tools, skopeo/umoci for OCI layouts,
# buildah for the Dockerfile test; boot loaders, firmware and file system tools for the disk and ISO formats.
APT_PACKAGES := docker-registry qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu \
  libvirt-clients libvirt-dev pkg-config busybox-static xorriso genisoimage zstd lz4 cpio kmod skopeo umoci \
  mtools dosfstools buildah debootstrap openssl libarchive-tools \
  isolinux syslinux syslinux-common syslinux-utils grub-efi-amd64-bin grub-pc-bin grub-common squashfs-tools ovmf fdisk \
  etcd-server etcd-client

.PHONY: setup apt venv test test-fast test-slow demo lint proto proto-check bench clean

setup: apt venv

apt: $(STAMPS)/apt
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ] || ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(STAMPS)/apt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[plugin,libvirt,aws,gcp,test]'
	@touch $@

lint: venv
	$(BIN)/ruff check .

# Generated protobuf/gRPC code is committed; `make proto` regenerates it, `make proto-check` fails when stale.
proto: venv
	$(BIN)/python -m mobykit.rpc.generate

proto-check: venv
	$(BIN)/pytest -q tests/test_proto_current.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m mobykit.demo

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf out $(STAMPS) .pytest_cache
