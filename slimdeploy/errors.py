"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class SlimError(Exception):
    """A problem with the user's input (model name, file, numbers, data).

    The message must be one line that says what is wrong and, where possible, what to do.
    """

