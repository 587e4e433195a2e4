"""User errors: mistakes in input that deserve one clear line and exit status 2, not a traceback."""


class UsageError(Exception):
    """Bad input from the user (a path, a file's contents, a flag). The message is the whole story."""

    exit_code = 2


class ColaDataError(UsageError):
    """A CoLA source that cannot be read; the message names the file and, where there is one, the line."""


class RunFailed(Exception):
    """A run that cannot go on (diverged training, say). One line says why; exit status 1."""

    exit_code = 1
