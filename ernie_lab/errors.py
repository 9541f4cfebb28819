"""Errors a user can act on. Entry scripts print these without a stack trace."""


class ErnieLabError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(ErnieLabError):
    """A config value that is unknown, out of range or impossible on this machine."""


class DataError(ErnieLabError):
    """A data file that is missing or has a malformed line (the message names file and line)."""


class MissingArtifactError(ErnieLabError):
    """A checkpoint or exported model that has not been made yet (the message names the command that makes it)."""


def choice_error(key: str, value, choices) -> ConfigError:
    """The standard message for a value outside its set of valid choices."""
    listed = ", ".join(str(c) for c in choices)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {listed}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise choice_error(key, value, choices)
