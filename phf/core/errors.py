"""The one exception type whose message is for the user."""


class PhfError(Exception):
    """An error with a message meant for the user: what went wrong and how to fix it. No traceback is shown."""
