"""Errors a user can cause. The CLI prints their message on one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, config key, argument, plugin name): the message
    names it and says what was expected."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type or an invalid combination."""

    MAX_LENGTH = 1000
    """Characters of a message kept at most: a message quotes values from the user's input."""

    def __init__(self, message: str = "") -> None:
        if len(message) > self.MAX_LENGTH:
            message = message[: self.MAX_LENGTH - 3] + "..."
        super().__init__(message)


class DatasetError(UserError):
    """A dataset folder, file or variable table that does not meet the dataset contract."""
