"""The error a user can act on: the CLI prints its message and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input or a state of the workdir that the user must fix; the message names the problem and the
    fix."""
