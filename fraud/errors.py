"""Errors that mean "the user asked for something that cannot be done": the CLI prints the
message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input or a precondition the user can fix. The message must say what and why."""

    exit_code = 2
