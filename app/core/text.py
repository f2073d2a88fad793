"""Which text a stored or queried field takes: one rule for the API, the dashboard and the CLI."""

from __future__ import annotations

import re

# What no text input takes: the C0 controls but tab (PostgreSQL refuses NUL outright; the others garble
# logs, pages and exports), DEL and the C1 controls, lone surrogates (not text: no UTF-8 database, log or
# JSON answer can hold one) and U+FFFD, what invalid UTF-8 in a query string or form is decoded into.
REFUSED_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")


def refused_character(value: str) -> str | None:
    """Why `value` is not text a field takes (its first refused character and where), or None."""
    bad = REFUSED_TEXT.search(value)
    if bad is None:
        return None
    code = ord(bad.group())
    if 0xD800 <= code <= 0xDFFF:
        what, why = "lone surrogate", " (not text: it has no UTF-8 encoding)"
    elif code == 0xFFFD:
        what, why = "replacement character", " (invalid UTF-8 decodes to it: the text sent was not UTF-8)"
    else:
        what, why = "control character", ""
    return (
        f"contains the {what} U+{code:04X} at position {bad.start()}{why}; text takes printable characters "
        "and tabs only"
    )
