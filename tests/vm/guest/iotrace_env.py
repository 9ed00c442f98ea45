#!/usr/bin/env python3
"""Make the project's ``iotrace`` package importable from a checkout that is only readable (the 9p
share tagged ``project`` in a guest), with the system's python3 and Debian's python3-bpfcc.

pyproject.toml maps the folders onto one package (``iotrace`` = exporter/, ``iotrace.probes`` =
probes/, ``iotrace.xentrace`` = xen-tracepoints/); an editable install needs pip and a writable tree.
Instead, a tree of symbolic links under a temporary directory mirrors that mapping and goes first on
``sys.path``. Python files are read in place, so the guest runs exactly the host's checkout.

    python3 iotrace_env.py /mnt/project -- serve --source qemu     # = iotrace serve --source qemu
    from iotrace_env import make_importable; make_importable("/mnt/project")
"""
import os
import sys
import tempfile

# pyproject.toml [tool.setuptools] package-dir
SUBPACKAGES = {"probes": "probes", "xentrace": "xen-tracepoints"}


def make_importable(project: str) -> str:
    """Put ``iotrace`` (from ``project``) first on sys.path; returns the directory added."""
    project = os.path.abspath(project)
    try:
        import iotrace
        if os.path.realpath(iotrace.__file__).startswith(os.path.join(project, "exporter")):
            return os.path.dirname(os.path.dirname(iotrace.__file__))     # already this checkout
        for name in [m for m in sys.modules if m == "iotrace" or m.startswith("iotrace.")]:
            del sys.modules[name]
    except ImportError:
        pass
    tree = tempfile.mkdtemp(prefix="iotrace-py-")
    pkg = os.path.join(tree, "iotrace")
    os.mkdir(pkg)
    exporter = os.path.join(project, "exporter")
    for entry in os.listdir(exporter):
        if entry != "__pycache__":
            os.symlink(os.path.join(exporter, entry), os.path.join(pkg, entry))
    for sub, folder in SUBPACKAGES.items():
        os.symlink(os.path.join(project, folder), os.path.join(pkg, sub))
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = tree + (os.pathsep + os.environ["PYTHONPATH"]
                                       if os.environ.get("PYTHONPATH") else "")
    sys.dont_write_bytecode = True        # the checkout is read-only
    return tree


def main(argv):
    if len(argv) < 2 or argv[1] != "--":
        print("usage: iotrace_env.py PROJECT -- IOTRACE-ARGS...", file=sys.stderr)
        return 2
    make_importable(argv[0])
    from iotrace.cli.main import main as iotrace_main
    return iotrace_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
