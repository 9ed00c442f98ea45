"""scripts/gen-cli-docs.py: man pages and bash completion generated from the argparse definitions.

The pages are rendered by groff (warnings are failures) and checked against the parser they came
from; the completion script is sourced by a real bash and asked what it completes.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from iotrace.cli.main import build_parser
from support import REPO, require_tool

pytestmark = pytest.mark.integration


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs",
                                                  REPO / "scripts" / "gen-cli-docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    written = gen.write_man(build_parser(), out, "9.9.9")
    return {p.name: p.read_text() for p in written}


@pytest.fixture(scope="module")
def completion(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bash") / "iotrace"
    path.write_text(gen.bash_completion(build_parser()))
    return path


def _verbs():
    return gen.verbs(build_parser())


def test_one_page_per_verb_and_an_overview(pages):
    assert set(pages) == {"iotrace.1"} | {f"iotrace-{v}.1" for v in _verbs()}
    overview = pages["iotrace.1"]
    for verb in _verbs():
        assert f"\\fBiotrace\\-{gen.esc(verb)}\\fR(1)" in overview


def test_every_option_and_the_examples_are_in_the_verbs_page(pages):
    for verb, (help_, p) in _verbs().items():
        page = pages[f"iotrace-{verb}.1"]
        assert f".TH IOTRACE\\-{gen.esc(verb.upper())} 1 " in page
        assert gen.esc(help_) in page
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            for opt in a.option_strings or [a.metavar or a.dest]:
                assert gen.esc(opt) in page, (verb, opt)
        if p.epilog:
            first_example = next(ln for ln in p.epilog.splitlines()
                                 if ln.strip() and not ln.lower().startswith("examples:"))
            assert ".SH EXAMPLES" in page and gen.esc(first_example) in page, verb


def test_pages_render_without_groff_warnings(pages, tmp_path):
    groff = require_tool("groff")
    for name, text in pages.items():
        r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z"], input=text.encode(),
                           capture_output=True)
        assert r.returncode == 0 and r.stderr == b"", (name, r.stderr)


def test_roff_escaping():
    assert gen.esc("--source") == "\\-\\-source"
    assert gen.esc(".config") == "\\&.config"             # a leading dot would be a request
    assert gen.esc("a\\b") == "a\\eb"


def _complete(completion: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last one being completed)."""
    bash = require_tool("bash")
    script = (f'. "{completion}"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _iotrace; '
              'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run([bash, "-c", script, "bash", *words], capture_output=True, text=True,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_completion_of_verbs_options_and_choices(completion):
    assert _complete(completion, "iotrace", "") == list(_verbs()) + ["-h", "--help", "--version"]
    assert _complete(completion, "iotrace", "se") == ["serve"]
    assert _complete(completion, "iotrace", "serve", "--so") == ["--source"]
    assert _complete(completion, "iotrace", "serve", "--source", "") == ["qemu", "xentrace", "both"]
    for verb, (_, p) in _verbs().items():
        want = [o for a in p._actions for o in a.option_strings]
        assert _complete(completion, "iotrace", verb, "-") == want, verb
        for a in p._actions:
            if a.choices and a.option_strings:
                got = _complete(completion, "iotrace", verb, a.option_strings[0], "")
                assert got == [str(c) for c in a.choices], (verb, a.dest)


def test_completion_of_files_only_where_a_file_is_meant(completion, tmp_path):
    (tmp_path / "capture.bin").write_bytes(b"")
    for verb, (_, p) in _verbs().items():
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.choices:
                continue
            got = _complete(completion, "iotrace", verb, a.option_strings[0], "cap", cwd=tmp_path)
            want = ["capture.bin"] if a.metavar in gen.FILE_METAVARS else []
            assert got == want, (verb, a.option_strings[0], a.metavar)
    assert _complete(completion, "iotrace", "report", "cap", cwd=tmp_path) == ["capture.bin"]
    assert _complete(completion, "iotrace", "top", "cap", cwd=tmp_path) == []   # interval, count


def test_file_metavars_are_the_cli_s_own():
    """FILE_METAVARS names metavars the CLI really uses (a renamed one would silently stop
    completing file names)."""
    used = {a.metavar for _, p in _verbs().values() for a in p._actions}
    assert gen.FILE_METAVARS <= used, gen.FILE_METAVARS - used
    assert not [m for m in used if isinstance(m, str) and re.fullmatch(r"FILE\w*|\w*PATH", m)
                and m not in gen.FILE_METAVARS]
