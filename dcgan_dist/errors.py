"""The one exception type for mistakes a user can make and fix (bad path, bad config, bad data)."""

import errno


class UserError(Exception):
    """A problem the user can fix; entry points print it as one line and exit non-zero."""


class TrainingDiverged(UserError):
    """A non-finite loss or weight: every rank stopped at the same step; nothing was checkpointed after it."""


# Exit codes of launch/train.py (documented in the README).
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75   # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; requeue to continue

DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EFBIG: "file size limit exceeded"}


def disk_error(e: OSError, writing: str, hint: str = "free space and run the same command again") -> UserError | None:
    """A UserError for a full/read-only/limited disk (something the user fixes), else None."""
    if e.errno not in DISK_ERRORS:
        return None
    return UserError(f"{DISK_ERRORS[e.errno]} while writing {writing} ({e.strerror}); {hint}")


def brief(e: BaseException, limit: int | None = None) -> str:
    """An exception's first line (at most ``limit`` characters), for one-line error messages."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""
