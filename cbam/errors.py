"""User errors: wrong input that the entry points report as one message, without a traceback."""


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""
