"""Exceptions for problems a user can fix (bad recipe, bad data, bad paths, a full disk) and for interrupted runs."""

import errno
import re

# Write failures the user fixes by freeing space or choosing another folder: reported as one line, exit 2.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def disk_errno(exc: BaseException) -> int | None:
    """The errno of a write failure the user fixes with space (DISK_ERRNOS), else None.

    Besides OSError, safetensors (Rust) reports I/O failures as its own exception type with "(os error N)" in the
    message: a full disk while saving weights is the same problem and gets the same one line.
    """
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_ERRNOS else None
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match.group(1)) if match and int(match.group(1)) in DISK_ERRNOS else None


class UserError(Exception):
    """A problem in the user's input. The CLI prints it on one line and exits with status 2.

    The message names what is wrong and how to fix it; it must not need a traceback to be understood.
    """

    def __init__(self, message: str, own: bool = False) -> None:
        super().__init__(" ".join(message.split()))
        self.own = own  # only this process met it (its peers may be gone): it says it itself, whatever its rank


class ReportedElsewhere(Exception):
    """Another process of the same launch hit the error and reported it; this one exits with its status quietly."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"stopped with exit status {exit_code}, reported by another process")
        self.exit_code = exit_code


class RunInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; carries the exit status (128 + signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


REMOTE_CODE_FIX = ("it ships its own Python code, which runs only when the recipe sets model.trust_remote_code: true "
                   "(set it if you trust that code)")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries put the cause there), for one-line errors.

    A library's refusal to run a model's own code names its own argument (`trust_remote_code=True`); the user's
    fix is the recipe key, so that is what is said instead.
    """
    if "trust_remote_code" in str(exc):
        return REMOTE_CODE_FIX
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else exc.__class__.__name__
