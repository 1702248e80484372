"""The one exception type that ExpertChat turns into a single-line error at the command line."""


class ExpertChatError(Exception):
    """A user-facing error: bad config, missing model or file, bad input.

    The message is one line naming the key or path and how to fix it; ``python -m expertchat`` prints it
    without a traceback (``HYDRA_FULL_ERROR=1`` shows the traceback).
    """
