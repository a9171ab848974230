"""User-facing errors: one clear line, a non-zero exit, no traceback.

Every mistake a user can make (bad data, a bad flag, a missing file) raises a `ChatsftError`; the CLI prints
its message on one line and exits with its `exit_code`. Anything else is a bug and keeps its traceback.
"""


class ChatsftError(Exception):
    """A user mistake: the message is printed as is, on one line."""

    exit_code = 2


class DataError(ChatsftError):
    """The data cannot be used as given (a file cannot be read, or too many records are invalid)."""

    exit_code = 2


class ConfigError(ChatsftError):
    """A flag, a config file or a model/template combination is wrong."""

    exit_code = 2


class RenderError(ValueError):
    """A record a template cannot render or train exactly; `reason` is a stable code counted by the audit."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
