"""Errors the CLI turns into one clear line and a non-zero exit (never a traceback)."""


class UserError(Exception):
    """Bad input or environment the operator can fix: str() is the one line to print."""
    exit_code = 2


class InputError(UserError):
    """An input file that cannot be read as what it claims to be (name the file, and the offset)."""


class OutputError(UserError):
    """An output file that cannot be created or written (exists, a symlink, disk full): one line
    naming the file, and what was kept."""
    exit_code = 1


class ProbeError(UserError):
    """A probe could not be set up (missing symbol, no permission, BCC missing)."""
    exit_code = 1


class ConfigError(UserError):
    """A configuration file is wrong; str() is one line naming the file, line and key."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.path, self.line, self.key, self.reason = path, line, key, message
        where = path or "<config>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")


def open_input(path, what: str, suffix: str = ""):
    """Open an input file for binary reading; any OSError becomes one InputError line naming it.

    ``what`` completes "is a directory, not <what>"; ``suffix`` is appended to every message
    (e.g. " (byte offset 0)" where the caller reports offsets)."""
    p = str(path)
    try:
        return open(p, "rb")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file{suffix}") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not {what}{suffix}") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror}{suffix}") from None
