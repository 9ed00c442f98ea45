# iotrace — make install | make test | make demo | make bench
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed

.PHONY: install test unit demo bench standin xtcore clean

install: $(STAMP) standin xtcore

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

# The xentrace decoder's compiled core (walk, order, both machines, outputs; loaded with ctypes
# by iotrace.xentrace.native). No Python headers needed: a plain shared library. Packagers:
# `make xtcore` builds it in place; XTCORE_CFLAGS adds their flags (hardening, -g).
XTCORE_SRC := $(wildcard xen-tracepoints/xt*.c)
XTCORE_CFLAGS ?=
xtcore: xen-tracepoints/_xtcore.so
# -flto lets the machines inline the walk's and the outputs' helpers across modules (about 30%
# faster); a compiler that cannot link with it builds the same library without.
XTCORE_LTO := $(shell echo 'int f(void){return 0;}' | $(CC) -flto -x c -shared -fPIC \
                -o /dev/null - 2>/dev/null && echo -flto)
xen-tracepoints/_xtcore.so: $(XTCORE_SRC) xen-tracepoints/xtcore.h
	$(CC) -O2 -Wall -Wextra -ffp-contract=off -fvisibility=hidden $(XTCORE_LTO) -shared -fPIC \
	    $(XTCORE_CFLAGS) -o $@ $(XTCORE_SRC)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests -m "not root and not integration" $(PYTEST_ARGS)

demo: install
	$(PY) -m iotrace demo

bench: install
	$(PY) bench/xentrace_decode.py
	$(PY) bench/probe_overhead.py
	$(PY) bench/exporter_scrape.py

clean:
	rm -rf $(VENV) .bootstrap-done build *.egg-info xen-tracepoints/_xtcore.so
	-$(MAKE) -s -C probes/standin clean
