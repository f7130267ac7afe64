"""The package's user-facing error types (configuration and input), imported by every layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be composed or validated; the message names the key and the fix."""


class InputError(ValueError):
    """A file or record given to a command that it cannot use; the message names it and the fix, so the CLI prints
    the message alone (exit 2), not a traceback. Commands' own data errors subclass it."""
