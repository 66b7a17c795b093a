class Bev3dError(Exception):
    """A user-facing error: bad input, a missing file, a wrong config key.

    The CLI prints the message and exits with code 2 (no traceback unless --debug),
    so the message must name the file or key and say how to fix it.
    """
