"""User errors: wrong input that the entry points report as one message, without a traceback."""


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class RunFolderInUse(UserError):
    """The run folder already holds another run; nothing in it may be written."""
