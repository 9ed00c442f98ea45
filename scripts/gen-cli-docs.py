#!/usr/bin/env python3
"""Man pages and bash completion generated from iotrace's argparse definitions (never by hand).

    python3 scripts/gen-cli-docs.py --man DIR [--bash-completion FILE]

Uses ``iotrace.cli.main.build_parser`` from whatever ``iotrace`` is importable: the Debian build
(deploy/debian/rules) points PYTHONPATH at the installed tree, so the pages and the completion
describe exactly the verbs the package ships. Writes, git-style:

* ``DIR/iotrace.1``: the overview (synopsis, the verbs, files, exit status);
* ``DIR/iotrace-VERB.1`` for each verb: its one-line help, usage, every option with its help, and
  the verb's examples (its argparse epilog) verbatim.

The bash completion offers the verbs, each verb's options, the choices of options that have
them, and file names for the arguments whose metavar names a file (``FILE_METAVARS``).
The page date is $SOURCE_DATE_EPOCH when set (dpkg sets it from debian/changelog: reproducible).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

FILE_METAVARS = {"FILE", "F", "PATH", "YAML", "BINARY", "OUT.json"}

# What the Debian package puts where (deploy/debian): named in iotrace(1).
FILES = [
    ("/etc/iotrace/iotrace.yaml",
     "address map overrides and the exporter: section (iotrace serve --config)"),
    ("/etc/default/iotrace", "IOTRACE_ARGS: the options iotrace.service passes to iotrace serve"),
    ("/lib/systemd/system/iotrace.service", "the exporter as a systemd service (not enabled)"),
    ("/usr/share/doc/iotrace/deployment.md", "deployment notes: sources, privileges, security"),
]

EXIT_STATUS = [
    ("0", "success"),
    ("1", "a probe could not be set up (missing symbol, no permission, BCC or tracefs missing)"),
    ("2", "bad input or configuration (the message names FILE:LINE where there is one)"),
    ("130", "interrupted (Ctrl-C)"),
]


# -- roff ----------------------------------------------------------------------------------------

def esc(text: str) -> str:
    """Text for a roff line: backslashes and dashes escaped, no control character at the start."""
    s = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + s if s[:1] in (".", "'") else s


def paragraphs(text: str) -> list[str]:
    out = []
    for block in text.strip().split("\n\n"):
        out += [".PP", esc(" ".join(block.split()))]
    return out


def synopsis(groups: list[str], words: int) -> list[str]:
    """The first ``words`` groups (the command) in bold, the rest filled; a group never breaks."""
    head = " ".join(groups[:words])
    rest = " ".join(esc(g).replace(" ", "\\ ") for g in groups[words:])
    return [f"\\fB{esc(head)}\\fR " + rest]


def verbatim(text: str) -> list[str]:
    return [".PP", ".nf", ".RS 2"] + [esc(ln) for ln in text.strip("\n").splitlines()] + \
        [".RE", ".fi"]


def page_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    return time.strftime("%Y-%m-%d", t)


# -- argparse ------------------------------------------------------------------------------------

def verbs(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """verb -> (one-line help, its parser), in the order the CLI lists them."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return {name: (helps.get(name, ""), p) for name, p in sub.choices.items()}


def options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(invocation, help) for every argument but -h, positionals first."""
    fmt = parser._get_formatter()
    acts = [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help != argparse.SUPPRESS]
    acts.sort(key=lambda a: bool(a.option_strings))
    out = []
    for a in acts:
        inv = fmt._format_action_invocation(a)
        out.append((inv, fmt._expand_help(a) if a.help else ""))
    return out


def usage_groups(parser: argparse.ArgumentParser) -> list[str]:
    """The usage line as argparse writes it, cut into its words and [bracketed groups]."""
    text = " ".join(parser.format_usage().split())
    if text.startswith("usage: "):
        text = text[len("usage: "):]
    groups, depth, cur = [], 0, ""
    for ch in text:
        if ch == " " and depth == 0:
            if cur:
                groups.append(cur)
            cur = ""
            continue
        depth += (ch in "[(") - (ch in "])")
        cur += ch
    return groups + ([cur] if cur else [])


# -- pages ---------------------------------------------------------------------------------------

def header(name: str, version: str) -> list[str]:
    # .nh .ad l: no hyphenation, ragged right (option names and paths must stay whole)
    return [f'.TH {esc(name.upper())} 1 "{page_date()}" "iotrace {version}" "iotrace manual"',
            ".nh", ".ad l"]


def option_list(parser) -> list[str]:
    lines = []
    for inv, text in options(parser):
        lines += [".TP", f"\\fB{esc(inv)}\\fR", esc(" ".join(text.split())) if text else ""]
    return [ln for ln in lines if ln != ""]


def verb_page(verb: str, help_: str, p: argparse.ArgumentParser, version: str) -> str:
    lines = header(f"iotrace-{verb}", version)
    lines += [".SH NAME", f"iotrace\\-{esc(verb)} \\- {esc(help_)}"]
    lines += [".SH SYNOPSIS"] + synopsis(usage_groups(p), 2)
    lines += [".SH DESCRIPTION"] + paragraphs(p.description or help_)
    lines += [".SH OPTIONS"] + option_list(p)
    if p.epilog:
        epilog = p.epilog.strip("\n")
        if epilog.lower().startswith("examples:\n"):      # the section heading says it already
            epilog = epilog.split("\n", 1)[1]
        lines += [".SH EXAMPLES"] + verbatim(epilog)
    lines += [".SH SEE ALSO", "\\fBiotrace\\fR(1)"]
    return "\n".join(lines) + "\n"


def overview_page(parser, table, version: str) -> str:
    lines = header("iotrace", version)
    lines += [".SH NAME", "iotrace \\- " + esc(
        "observe the I/O requests of Xen HVM guests to their emulated devices, from Dom0")]
    lines += [".SH SYNOPSIS", ".B iotrace",
              "[\\fB\\-\\-version\\fR] \\fIVERB\\fR [\\fIoptions\\fR]"]
    lines += [".SH DESCRIPTION"] + paragraphs(parser.description or "")
    lines += paragraphs("Each verb has its own page, iotrace-VERB(1), and its examples in "
                        "iotrace VERB --help.")
    lines += [".SH COMMANDS"]
    for verb, (help_, _) in table.items():
        lines += [".TP", f"\\fBiotrace\\-{esc(verb)}\\fR(1)", esc(help_)]
    lines += [".SH OPTIONS"] + option_list(parser)
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    lines += [".SH EXIT STATUS"]
    for code, what in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", esc(what)]
    lines += [".SH SEE ALSO", ",\n".join(f"\\fBiotrace\\-{esc(v)}\\fR(1)" for v in table)]
    return "\n".join(lines) + "\n"


def write_man(parser, outdir: Path, version: str) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    table = verbs(parser)
    written = [outdir / "iotrace.1"]
    written[0].write_text(overview_page(parser, table, version))
    for verb, (help_, p) in table.items():
        path = outdir / f"iotrace-{verb}.1"
        path.write_text(verb_page(verb, help_, p, version))
        written.append(path)
    return written


# -- completion ----------------------------------------------------------------------------------

def takes_value(a: argparse.Action) -> bool:
    return a.nargs != 0


def completion_of(a: argparse.Action) -> str:
    """What a value of ``a`` completes to: "choices", "files" or "" (free text: nothing)."""
    if a.choices:
        return "choices"
    return "files" if a.metavar in FILE_METAVARS else ""


def _words(items) -> str:
    return " ".join(dict.fromkeys(items))          # in order, each once


def _value_cases(p: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in p._actions:
        if not a.option_strings or not takes_value(a):
            continue
        kind = completion_of(a)
        pattern = "|".join(a.option_strings)
        if kind == "choices":
            body = f'COMPREPLY=($(compgen -W "{_words(str(c) for c in a.choices)}" -- "$cur"))'
        elif kind == "files":
            body = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            body = ":"                                  # a number, a name, ...: nothing to offer
        out.append(f"                {pattern}) {body}; return ;;")
    return out


def bash_completion(parser) -> str:
    """A bash completion script for ``iotrace``: verbs, each verb's options, the values of options
    with choices, file names where an argument names a file (``FILE_METAVARS``)."""
    table = verbs(parser)
    top = [o for a in parser._actions for o in a.option_strings]
    lines = ["# bash completion for iotrace(1): generated from its argparse definitions by",
             "# scripts/gen-cli-docs.py (do not edit)",
             "_iotrace()",
             "{",
             "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} verb= i",
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case ${COMP_WORDS[i]} in -*) ;; *) verb=${COMP_WORDS[i]}; break ;; esac',
             "    done",
             "    case $verb in",
             f'        "") COMPREPLY=($(compgen -W "{_words(list(table) + top)}" -- "$cur")) ;;']
    for verb, (_, p) in table.items():
        opts = [o for a in p._actions for o in a.option_strings]
        pos_files = any(not a.option_strings and completion_of(a) == "files"
                        for a in p._actions)
        lines.append(f"        {verb})")
        cases = _value_cases(p)
        if cases:
            lines += ["            case $prev in"] + cases + ["            esac"]
        lines.append(f'            if [[ $cur == -* ]]; then '
                     f'COMPREPLY=($(compgen -W "{_words(opts)}" -- "$cur"))')
        if pos_files:
            lines.append('            else COMPREPLY=($(compgen -f -- "$cur"))')
        lines += ["            fi ;;"]
    lines += ["    esac", "}", "complete -o filenames -F _iotrace iotrace", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--man", metavar="DIR", type=Path, help="write the man pages here")
    ap.add_argument("--bash-completion", metavar="FILE", type=Path,
                    help="write the bash completion script here")
    args = ap.parse_args(argv)
    from iotrace import __version__
    from iotrace.cli.main import build_parser
    if args.man:
        for path in write_man(build_parser(), args.man, __version__):
            print(path)
    if args.bash_completion:
        args.bash_completion.parent.mkdir(parents=True, exist_ok=True)
        args.bash_completion.write_text(bash_completion(build_parser()))
        print(args.bash_completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
