"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class InkwashError(Exception):
    """A problem with the user's input (a path, an option, a file), not a bug."""
