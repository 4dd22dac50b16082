"""The one exception type for problems a user can fix (bad recipe, bad data, bad paths)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints it on one line and exits with status 2.

    The message names what is wrong and how to fix it; it must not need a traceback to be understood.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
