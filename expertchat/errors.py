"""The one exception type that ExpertChat turns into a single-line error at the command line."""


class ExpertChatError(Exception):
    """A user-facing error: bad config, missing model or file, bad input.

    The message is one line naming the key or path and how to fix it; ``python -m expertchat`` prints it
    without a traceback (``HYDRA_FULL_ERROR=1`` shows the traceback).
    """


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (``""`` when it has none), cut to ``limit`` characters: how a
    library error is quoted inside a one-line ExpertChat error."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def check(ok: bool, key: str, message: str) -> None:
    """A config check: raise ``ExpertChatError("config error: <key> <message>")`` unless ``ok``.

    >>> check(False, "topics.n", "must be > 0")
    Traceback (most recent call last):
    expertchat.errors.ExpertChatError: config error: topics.n must be > 0
    """
    if not ok:
        raise ExpertChatError(f"config error: {key} {message}")
