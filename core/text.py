"""Clean-up of incoming user text so any string a platform delivers can be stored and prompted."""

from __future__ import annotations

import re

# C0 and C1 control characters except tab, newline and carriage return; also DEL.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize_user_text(text: str) -> str:
    """Make ``text`` storable in SQLite and PostgreSQL, keeping what the user meant.

    PostgreSQL rejects NUL characters, and no UTF-8 codec accepts a lone
    surrogate, so either would lose the turn. Control characters carry no
    meaning in chat and are removed.
    Right-to-left marks, emoji and every other printable character stay.
    """
    if _LONE_SURROGATE.search(text):
        # A well-formed surrogate pair (from a UTF-16 platform) becomes its
        # character again; an unpaired one becomes U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = _CONTROL.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n")
