"""Error classes the CLI turns into a clear message and an exit status, never a traceback."""


class ShadowJudgeError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class InputError(ShadowJudgeError):
    """Bad input from the user: a config, a file, an argument."""

    exit_code = 2
