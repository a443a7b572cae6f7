"""The one base class of the errors a user causes (a bad config, bad data, a model that is not there).

Every stage raises a subclass of TunewiseError with a message that says what and where; the CLI catches this
one type and prints the message as one line (no traceback). It imports nothing, so the CLI can catch it
without loading torch."""


class TunewiseError(Exception):
    """An error the user can fix; its message says what and where (file, line, field, key)."""
