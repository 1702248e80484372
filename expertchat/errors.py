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


def check_placeholders(template: str, key: str, names: tuple[str, ...]) -> None:
    """A config check of a ``str.format`` template: raise ``ExpertChatError`` when ``template`` uses a placeholder
    other than ``names`` (or a malformed brace), naming ``key`` and the placeholders it may use, in ``names``' order.

    >>> check_placeholders("Rate {a} {x}", "k", ("a", "b"))
    Traceback (most recent call last):
    expertchat.errors.ExpertChatError: config error: k may only use the placeholders {a}, {b} (found KeyError('x'))
    """
    try:
        template.format(**{n: "x" for n in names})
    except (KeyError, IndexError, ValueError) as exc:
        raise ExpertChatError(f"config error: {key} may only use the placeholders "
                              f"{', '.join('{' + n + '}' for n in names)} (found {exc!r})") from None
