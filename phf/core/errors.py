"""The one exception type whose message is for the user."""


class PhfError(Exception):
    """An error with a message meant for the user: what went wrong and how to fix it. No traceback is shown."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its type's name when empty): the reason inside a one-line
    PhfError, without the tracebacks and hints some libraries put on the following lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
