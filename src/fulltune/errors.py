"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""


class UserError(Exception):
    """A bad input (file, line, config key, data) described in one clear message."""


class Interrupted(Exception):
    """The run stopped at the user's request (Ctrl-C, SIGTERM) after saving a checkpoint."""
