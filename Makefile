# iotrace — make install | make test | make test-kernels | make demo | make bench
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed

.PHONY: install test test-kernels vm-images unit demo bench standin xtwalk clean

install: $(STAMP) standin xtwalk

# System packages (apt, as root) and the kernel-headers link BCC needs; idempotent.
.bootstrap-done: scripts/bootstrap-debian.sh
	bash scripts/bootstrap-debian.sh
	touch $@

# The venv sees Debian's python3-bpfcc through --system-site-packages (never PyPI's "bcc").
$(STAMP): .bootstrap-done pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

standin: $(STAMP)
	$(MAKE) -s -C probes/standin

# The xentrace decoder's record-boundary walk (loaded with ctypes; NumPy fallback without it).
xtwalk: xen-tracepoints/_xtwalk.so
xen-tracepoints/_xtwalk.so: xen-tracepoints/xtwalk.c
	$(CC) -O2 -Wall -Wextra -shared -fPIC -o $@ $<

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The kernel matrix (issue #16): the BPF programs in every mode on Debian 12's 6.1 and Debian 13's
# 6.12 (QEMU TCG guests, tests/vm) and on the host's kernel, exact counts on a stand-in. As root.
# Images are built once into /var/cache/iotrace/vm (IOTRACE_VM_CACHE) and reused: see
# tests/vm/README.md for what it costs, cold and warm.
test-kernels: install
	IOTRACE_VM=1 $(PY) -m pytest tests/vm $(PYTEST_ARGS)

# Build (or find) the guest images only.
vm-images:
	$(PY) tests/vm/image.py build bookworm
	$(PY) tests/vm/image.py build trixie

unit: install
	$(PY) -m pytest tests -m "not root and not integration" $(PYTEST_ARGS)

demo: install
	$(PY) -m iotrace demo

bench: install
	$(PY) bench/xentrace_decode.py
	$(PY) bench/probe_overhead.py
	$(PY) bench/exporter_scrape.py

clean:
	rm -rf $(VENV) .bootstrap-done build *.egg-info xen-tracepoints/_xtwalk.so
	-$(MAKE) -s -C probes/standin clean
