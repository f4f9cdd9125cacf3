"""The error every data reader raises for missing, malformed or unreadable data."""

from cbam.errors import UserError


class DataError(UserError):
    """A data set is missing or malformed; the message names the file and the fix."""
