"""Errors the CLI turns into one clear line and a non-zero exit (never a traceback)."""


class UserError(Exception):
    """Bad input or environment the operator can fix: str() is the one line to print."""
    exit_code = 2


class InputError(UserError):
    """An input file that cannot be read as what it claims to be (name the file, and the offset)."""


class ProbeError(UserError):
    """A probe could not be set up (missing symbol, no permission, BCC missing)."""
    exit_code = 1
