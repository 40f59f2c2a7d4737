"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """A bad input (file, line, config key, data) described in one clear message."""


class Interrupted(Exception):
    """The run stopped at the user's request (Ctrl-C, SIGTERM); exit 128 + the signal (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class OutOfMemory(Exception):
    """A step ran out of device memory; the message has the estimate's breakdown and the planner's
    suggestion (memory/runcheck.out_of_memory_line). Exit 3."""
