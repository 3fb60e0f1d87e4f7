"""The errors a user's mistake raises: the command line prints their message alone (no traceback); any other
exception is a bug and keeps its traceback.

Each message names the config key, file or option at fault and the fix. They subclass ValueError (a bad value)
or FileNotFoundError (a missing file), so code that catches those still catches them.
"""


class UserError(Exception):
    """Something the user can fix: a config value, an override, a missing asset, data that does not fit."""


class ConfigError(UserError, ValueError):
    """A config value, or a combination of them, that cannot work; found before any data or model loads."""


class InputError(UserError, ValueError):
    """Data, an asset or a model that does not fit the config, found once loading starts (a missing column, a
    rank larger than a layer, a model and a dataset that answer differently)."""


class MissingFile(InputError, FileNotFoundError):
    """A file or folder the config points at (or an installed package should hold) is not there."""
