# iotrace — make install | make test | make test-kernels | make demo | make bench | make deb | make test-deb
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed

.PHONY: install testbed test test-kernels test-xen xen-image vm-images unit lint demo bench standin native xtcore deb test-deb clean

# The test bed: packages, venv, builds, and the machine state the tests need (testbed).
install: $(STAMP) standin native testbed

# tracefs mounted, the kernel-headers link, no prometheus service: checked (and made so) every
# time, since none of it survives a reboot (scripts/testbed-state.sh).
testbed: .bootstrap-done
	bash scripts/testbed-state.sh

# System packages (apt, as root); idempotent.
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

# Everything compiled that the package ships (deploy/debian/rules builds this target, with
# Debian's hardening CFLAGS/LDFLAGS in the environment).
native: xtcore

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
	$(CC) $(CPPFLAGS) $(CFLAGS) -O2 -Wall -Wextra -ffp-contract=off -fvisibility=hidden \
	    $(XTCORE_LTO) -shared -fPIC $(XTCORE_CFLAGS) $(LDFLAGS) -o $@ $(XTCORE_SRC)

# The lint gate: ruff's rule set (pyproject.toml [tool.ruff]) and no path of a build machine in
# the sources (comments cite files of this repository or upstream sources).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	clang-format --dry-run -Werror $$(git ls-files '*.c' '*.h' 2>/dev/null || find probes xen-tracepoints -name '*.[ch]')
	bash scripts/check-no-machine-paths.sh

test: install lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The kernel matrix (issue #16): the BPF programs in every mode on Debian 12's 6.1 and Debian 13's
# 6.12 (QEMU TCG guests, tests/vm) and on the host's kernel, exact counts on a stand-in. As root.
# Images are built once into /var/cache/iotrace/vm (IOTRACE_VM_CACHE) and reused: see
# tests/vm/README.md for what it costs, cold and warm.
test-kernels: install
	IOTRACE_VM=1 $(PY) -m pytest tests/vm $(PYTEST_ARGS)

# A real Xen (issue #15): Xen 4.17 + a Debian 12 Dom0 under QEMU TCG, two HVM guests, both sources
# against the guests' own counts, inside Dom0 (tests/xen/README.md: what it costs). As root. The
# Dom0 image is cached in /var/cache/iotrace/vm like the kernel matrix's.
test-xen: install
	IOTRACE_XEN=1 $(PY) -m pytest tests/xen/test_harness_units.py tests/xen/test_window.py \
	    tests/xen/test_serve.py tests/xen/test_advise.py $(PYTEST_ARGS)

xen-image:
	$(PY) tests/xen/dom0_image.py

# Build (or find) the guest images only.
vm-images:
	$(PY) tests/vm/image.py build bookworm
	$(PY) tests/vm/image.py build trixie

unit: install
	$(PY) -m pytest tests -m "not root and not integration" $(PYTEST_ARGS)

demo: install
	$(PY) -m iotrace demo

# The Debian package, out/iotrace_<version>_<arch>.deb (lintian must pass: scripts/build-deb.sh).
deb:
	bash scripts/build-deb.sh

# The package installed in a fresh Debian 12 chroot (tests/package/test_deb.py).
test-deb: deb $(STAMP)
	$(PY) -m pytest tests/package -m deb $(PYTEST_ARGS)

bench: install
	$(PY) bench/xentrace_decode.py
	$(PY) bench/probe_overhead.py
	$(PY) bench/exporter_scrape.py
	$(PY) bench/resolver.py
	$(PY) bench/discovery.py
	$(PY) bench/advise_contention.py

clean:
	rm -rf $(VENV) .bootstrap-done build out *.egg-info xen-tracepoints/_xtcore.so
	-$(MAKE) -s -C probes/standin clean
