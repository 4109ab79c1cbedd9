"""The one exception type for mistakes a user can make and fix (bad path, bad config, bad data)."""

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; entry points print it as one line and exit non-zero."""


class TrainingDiverged(UserError):
    """A non-finite loss or weight: every rank stopped at the same step; nothing was checkpointed after it."""


class StoppedWaiting(Exception):
    """A stop request arrived while the trainer waited for data that did not come (a hung shard server): it
    stops at once, without a checkpoint. ``reason``: "signal" or "STOP file"; ``what``: where the data comes from."""

    def __init__(self, reason: str, what: str) -> None:
        super().__init__(f"stopped by {reason} while waiting for data from {what}")
        self.reason, self.what = reason, what


# Exit codes of launch/train.py (documented in the README).
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75   # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; requeue to continue
EXIT_PEER_LOST = 76   # a rank was lost (its node died, or could not be reached): requeue to resume

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


def write_failure(e: BaseException, folder: Path) -> OSError | None:
    """The OSError behind a failed write that a library reports as its own type, else None: safetensors'
    SafetensorError carries the errno in its text ("... (os error 28)"); torch.save's RuntimeError
    ("PytorchStreamWriter failed writing file", "unexpected pos") carries none, so a 4 MiB probe write in
    ``folder`` asks the disk (full, quota, read-only, file size limit)."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    code = re.search(r"\(os error (\d+)\)", text)
    if type(e).__name__ == "SafetensorError" and code:
        n = int(code.group(1))
        return OSError(n, os.strerror(n))
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "unexpected pos" in text):
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(4 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as probe_error:
            return probe_error
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    return None
