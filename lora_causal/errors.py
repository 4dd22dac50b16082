"""Exceptions for problems a user can fix (bad recipe, bad data, bad paths, a full disk) and for interrupted runs."""

import errno

# Write failures the user fixes by freeing space or choosing another folder: reported as one line, exit 2.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class UserError(Exception):
    """A problem in the user's input. The CLI prints it on one line and exits with status 2.

    The message names what is wrong and how to fix it; it must not need a traceback to be understood.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries put the cause there), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else exc.__class__.__name__
