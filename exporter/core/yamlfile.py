"""YAML loading that remembers where each value came from, so errors can say file:line: key.

``load_yaml(path)`` returns plain dicts/lists (subclasses ``MarkedDict``/``MarkedList`` that carry the
line of every key or item). ``ConfigError`` is what every config problem raises: its message is one
line, ``FILE:LINE: KEY: what is wrong``, ready for the CLI to print (it lives in
``iotrace.core.errors`` with the other errors an operator can fix).
"""
from __future__ import annotations

import yaml

from iotrace.core.errors import ConfigError


class MarkedDict(dict):
    """A dict that knows the 1-based line of each key (``line_of``) and of itself (``line``)."""
    line: int | None = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.key_lines: dict = {}

    def line_of(self, key):
        return self.key_lines.get(key, self.line)


class MarkedList(list):
    line: int | None = None

    def __init__(self, *a):
        super().__init__(*a)
        self.item_lines: list[int | None] = []

    def line_of(self, index: int):
        if 0 <= index < len(self.item_lines):
            return self.item_lines[index]
        return self.line


# libyaml's parser when PyYAML has it (Debian's python3-yaml does): the same safe constructors
# and marks, several times faster - every verb loads the default address map at start-up.
class _MarkedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    pass


def _construct_mapping(loader, node):
    result = MarkedDict()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise ConfigError("mapping key is not a scalar", None, key_node.start_mark.line + 1)
        if key in result:
            raise ConfigError("duplicate key", None, key_node.start_mark.line + 1, str(key))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader, node):
    result = MarkedList()
    result.line = node.start_mark.line + 1
    for child in node.value:
        result.append(loader.construct_object(child, deep=True))
        result.item_lines.append(child.start_mark.line + 1)
    return result


_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, path: str = "<string>"):
    """Parse YAML text into Marked containers; syntax errors become ConfigError with the line."""
    try:
        return yaml.load(text, Loader=_MarkedLoader)  # noqa: S506 - SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(exc.reason, path, exc.line, exc.key) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", path, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path) from None


def load_yaml(path: str):
    """Read and parse a YAML file; a missing or unreadable file is a ConfigError too."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text (UTF-8) file", path) from None
    return parse_yaml(text, path)


def yaml_kind(value) -> str:
    """What a parsed YAML value is, in YAML's words (never a Python class name)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a value of another kind"


def require_mapping(value, path, what, line=None):
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {yaml_kind(value)}", path,
                          getattr(value, "line", line), what)
    return value


def check_keys(mapping: MarkedDict, allowed, path: str, where: str = ""):
    """Reject unknown keys (a typo in a config should not pass silently)."""
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key (expected one of: {', '.join(sorted(allowed))})",
                              path, mapping.line_of(key), f"{where}{key}")


def as_int(value, path, line, key) -> int:
    """An integer given as a YAML int or a string like '0x3f8'."""
    if isinstance(value, bool):
        raise ConfigError(f"expected an integer, got {value!r}", path, line, key)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise ConfigError(f"expected an integer (e.g. 0x3f8), got {value!r}", path, line, key)
