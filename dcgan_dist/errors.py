"""The one exception type for mistakes a user can make and fix (bad path, bad config, bad data)."""


class UserError(Exception):
    """A problem the user can fix; entry points print it as one line and exit non-zero."""
