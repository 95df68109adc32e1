"""The one exception type a user can meet."""


class PathflipError(Exception):
    """A problem the user can act on (bad file, missing weights, out of memory, ...).

    The message always says what happened and what to do about it. The napari layer turns it into a
    notification; the CLI prints it without a traceback and exits with status 2.
    """
