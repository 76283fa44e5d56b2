"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class NagError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""
