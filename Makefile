# iotrace — make install | make test | make demo | make bench
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed

.PHONY: install test unit lint demo bench standin xtwalk clean

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

# The lint gate: ruff's rule set (pyproject.toml [tool.ruff]) and no path of a build machine in
# the sources (comments cite files of this repository or upstream sources).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	bash scripts/check-no-machine-paths.sh

test: install lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests -m "not root and not integration" $(PYTEST_ARGS)

demo: install
	$(PY) -m iotrace demo

bench: install
	$(PY) bench/xentrace_decode.py
	$(PY) bench/probe_overhead.py
	$(PY) bench/exporter_scrape.py
	$(PY) bench/advise_contention.py

clean:
	rm -rf $(VENV) .bootstrap-done build *.egg-info xen-tracepoints/_xtwalk.so
	-$(MAKE) -s -C probes/standin clean
