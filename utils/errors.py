"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A bad flag, file or folder, with a one-line message that names the value and the fix.

    Each script's ``main()`` prints the message to stderr and exits with status 2, without a
    traceback unless ``--debug`` is given. Anything else that escapes is a bug.
    """
