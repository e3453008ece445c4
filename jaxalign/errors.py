"""The one exception type users see: it says what was wrong, where, and what to do."""


class JaxalignError(Exception):
    """A user-facing error (bad config, bad data row, missing file, incompatible checkpoint)."""
