"""DreamHead core (placeholder while the scheduler is written; see issue 2)."""


class UsageError(Exception):
    """Bad user input: the CLI prints the message as one line and exits with code 2."""
