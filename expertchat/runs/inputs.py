"""One reader for every JSONL file of records: the inputs (topics of ``topics=jsonl``, answers to rate in
``mode=rate``, evaluation prompts) and the run folder's own files (``RunStore.read``, ``RunStore.begin`` and the
report's ``reader.load``: each decides what a bad line means to it, from the line numbers and reasons given here).
It lives here, beside the inputs, because the inputs need every rule below; the run folder's files, written by
``RunStore.append``, only ever meet the simplest of them (a line cut by a kill mid-write).

What it accepts, as files from other tools come: JSONL (one JSON value per line; lines split on ``\\n`` only,
so a raw U+2028 or U+0085 inside a string is the legal JSON it is; CRLF endings and blank lines are fine), UTF-8
with or without a byte-order mark, and a file holding one JSON array of records (AlpacaEval's outputs). What it
refuses, per record and by line number, never silently: a line that is not UTF-8 (with the byte's offset), a
line that is not JSON, a string with a lone surrogate (a JSON escape such as ``"\\ud800"``, which no UTF-8 text
can hold). Chat message content given as parts (``[{"type": "text", "text": ...}]``) is joined into its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


@dataclass
class Records:
    """The records of a file: ``good`` as (line number, value) and ``bad`` as ``{"line", "reason"}``."""

    good: list[tuple[int, Any]]
    bad: list[dict[str, Any]]
    array: bool = False  # the file was one JSON array (line numbers are then the records' 1-based positions)


def read_records(path: str | Path) -> Records:
    """Read a JSONL file (or a JSON array of records) into its records, each bad one with its line and reason.

    Raises:
        FileNotFoundError: ``path`` is not a file (callers turn it into a one-line error naming their key).
    """
    data = Path(path).expanduser().read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    if data.lstrip()[:1] == b"[":
        whole = _json_array(data)
        if whole is not None:
            return whole
    good: list[tuple[int, Any]] = []
    bad: list[dict[str, Any]] = []
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        value, reason = decode_record(raw, start)
        if reason:
            bad.append({"line": lineno, "reason": reason})
        else:
            good.append((lineno, value))
    return Records(good, bad)


def _json_array(data: bytes) -> Records | None:
    """A file that is one JSON array: its elements as records (``None`` if it is not one, e.g. JSONL lines that
    are each an array)."""
    value, reason = decode_record(data, 0)
    if reason or not isinstance(value, list):
        return None
    return Records([(i, v) for i, v in enumerate(value, start=1)], [], array=True)


def decode_record(raw: bytes, start: int = 0) -> tuple[Any, str | None]:
    """One JSON value from UTF-8 bytes (one line of a JSONL file, or a whole file).

    Args:
        raw: the bytes, without the line's ``\\n``.
        start: their byte offset in the file (named in the reason for a byte that is not UTF-8).

    Returns:
        ``(value, None)``, or ``(None, reason)`` when the bytes are not valid UTF-8, JSON, or Unicode.

    >>> decode_record(b'{"a": 1}'), decode_record(b'{"a": ')
    (({'a': 1}, None), (None, 'not valid JSON (Expecting value)'))
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {start + exc.start} of the file "
                      f"(re-save the file as UTF-8)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    if _has_lone_surrogate(value):
        return None, "a string holds a lone surrogate (an invalid \\ud800-\\udfff escape): not valid Unicode"
    return value, None


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def message_text(content: Any) -> str:
    """The text of a chat message's ``content``: a string as it is, or text parts joined by blank lines.

    >>> message_text([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}])
    'Hello\\n\\nworld'

    Raises:
        ValueError: a part that is not text (an image, audio, ...), or content of another type.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"a message has a '{kind}' content part: only text can be rated")
        return "\n\n".join(texts)
    raise ValueError(f"message content is a {type(content).__name__}, not text or text parts")
