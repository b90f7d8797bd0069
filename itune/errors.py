"""The one kind of failure a user can fix: `UserError`.

Library code raises it (or a subclass such as `itune.data.sources.DataError`) for a mistake in
what the user gave: a config, a path, a record, a workdir that holds another run. Its message is
one line that says what is wrong, where, and what to do; the commands (`itune.cli`) print that
line and exit with status 1, with no traceback unless ``--verbose``.
"""


class UserError(Exception):
    """A mistake in the user's input, stated in one line: what, where, what to do."""


class ConfigError(UserError, ValueError):
    """A config that cannot run: a bad value, or one that contradicts the run in the workdir."""
