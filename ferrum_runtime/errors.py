"""The base of every error a user can fix. The CLI prints these as one line; anything else is a bug."""


class FerrumError(Exception):
    """A problem with the user's input, files or machine; the message names the fix."""
