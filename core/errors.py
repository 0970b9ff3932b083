"""The user's mistakes: every command line prints them as one line (no traceback) and exits 1."""


class UserError(Exception):
    """A problem the user can fix (a file, a record, a setting); the message says what and how."""


class DataError(UserError):
    """A data file or record: which file, which record or line, what is wrong."""


class ConfigError(UserError):
    """A setting: which key, what is wrong, the valid values."""
