"""Text that came from peers, made safe to show on a terminal or write to a log.

A record's model id, host and transport names are chosen by whoever signed it. Shown as
they are they could move the cursor, retitle the terminal or hide text (CSI/OSC escape
sequences start with ESC, 0x1b), forge log lines (a newline), reorder what is read
(Unicode bidi overrides) or, read as rich markup, crash the view (``[/]`` closes a tag
that was never opened). :func:`printable` escapes every such character visibly
(``\\x1b``, ``\\n``, ``\\u202e``) and bounds the length; the view then renders the result
as rich ``Text`` (never as markup). The CLI's log formatter runs every log line through
the same function, so no role's log can carry an escape sequence from a peer.
"""

from __future__ import annotations

import re

#: C0 controls (ESC, newline, tab, CR...), DEL and C1 controls (0x9b is a one-byte CSI),
#: zero-width and bidi formatting characters, line/paragraph separators and the BOM.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
#: the same without newline: kept in tracebacks, whose frames are this process's own text
_UNSAFE_MULTILINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")

#: untrusted fields longer than this are cut (with an ellipsis) before they are shown
DEFAULT_LIMIT = 200


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``text`` with control and formatting characters escaped, cut to ``limit`` characters
    of input (None: no cut). Plain text passes unchanged."""
    s = text if isinstance(text, str) else str(text)
    cut = limit is not None and len(s) > limit
    if cut:
        s = s[:limit]
    s = _UNSAFE.sub(_escape, s)
    return s + "…" if cut else s


def printable_lines(text: str) -> str:
    """Like :func:`printable` without a length limit, keeping newlines (tracebacks)."""
    return _UNSAFE_MULTILINE.sub(_escape, text)
