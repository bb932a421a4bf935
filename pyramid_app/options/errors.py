"""The errors that are the user's: what the CLI prints as one line and the studio shows as one sentence, never as a
traceback (a bad value or name, a missing file, a hub that cannot be reached)."""

USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)
