"""What a store URL may show: DSNs without their passwords, for messages, logs and `eventcore status`.

Imports no database driver, so every command can show a URL whatever backends are installed.
Redaction works on the text as written, by libpq's own rules for where a password sits (a URL's
userinfo runs from `//` to the first `@` before any `/`; query parameters are split on `&` and
percent-decoded), and changes nothing else: a URL without a secret comes back byte for byte
(`sqlite:////abs.db`, `memory://`, a `?host=/socket/dir`), which re-assembling a parsed URL does not
guarantee (an empty host loses its `//`, values get re-encoded).
"""
from __future__ import annotations

import re
from urllib.parse import unquote

#: Connection parameters holding a secret: the password and the passphrase of the client's SSL key.
SECRET_PARAMS = ("password", "sslpassword")
#: A secret in libpq's key=value form (password=..., quoted or not).
_KEYWORD_SECRET = re.compile(r"\b((?:ssl)?password\s*=?\s*)('(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE)
MASK = "***"


def scheme(dsn: str) -> str:
    """The URL's scheme, lower case ("none" for libpq's key=value form): safe to show, never the whole string."""
    return dsn.split("://", 1)[0].lower() if "://" in dsn else "none"


def _userinfo_span(dsn: str) -> tuple[int, int] | None:
    """(start, end) of the userinfo of a URL (the text before its '@'), or None when it has none."""
    start = dsn.index("://") + 3
    end = start
    while end < len(dsn) and dsn[end] not in "@/":
        end += 1
    return (start, end) if end < len(dsn) and dsn[end] == "@" else None


def _query_start(dsn: str, after: int) -> int | None:
    at = dsn.find("?", after)
    return None if at < 0 else at + 1


def split_query(url: str) -> tuple[str, str | None]:
    """(everything before the query, the query without its '?' or None), split where libpq splits:
    at the first '?' after the userinfo (a '?' in a password is part of it)."""
    userinfo = _userinfo_span(url)
    query = _query_start(url, userinfo[1] + 1 if userinfo else url.index("://") + 3)
    return (url, None) if query is None else (url[:query - 1], url[query:])


def _url_secret_spans(dsn: str) -> list[tuple[int, int]]:
    """(start, end) of each secret in a URL: the userinfo's password and secret query values."""
    spans = []
    userinfo = _userinfo_span(dsn)
    after = dsn.index("://") + 3
    if userinfo is not None:
        start, end = userinfo
        colon = dsn.find(":", start, end)
        if colon >= 0:
            spans.append((colon + 1, end))
        after = end + 1
    query = _query_start(dsn, after)
    if query is not None:
        pos = query
        for pair in dsn[query:].split("&"):
            key, eq, _ = pair.partition("=")
            if eq and unquote(key).strip().lower() in SECRET_PARAMS:
                spans.append((pos + len(key) + 1, pos + len(pair)))
            pos += len(pair) + 1
    return spans


def redact(dsn: str) -> str:
    """The DSN (a URL or libpq's key=value form) with its passwords replaced by ***, nothing else changed."""
    if "://" not in dsn:
        return _KEYWORD_SECRET.sub(rf"\1{MASK}", dsn)
    out = dsn
    for start, end in sorted(_url_secret_spans(dsn), reverse=True):
        out = out[:start] + MASK + out[end:]
    return out


def without_secrets(text: str, dsn: str) -> str:
    """`text` (e.g. a message of libpq's, which may quote the URL or one of its values) with the DSN's
    passwords, as written and percent-decoded, replaced by ***."""
    if "://" in dsn:
        secrets = [dsn[start:end] for start, end in _url_secret_spans(dsn)]
    else:
        secrets = [m.group(2) for m in _KEYWORD_SECRET.finditer(dsn)]
        secrets += [s.strip("'").replace("\\'", "'").replace("\\\\", "\\") for s in secrets]
        secrets += [s.strip("'") for s in secrets]
    for secret in sorted({s for raw in secrets for s in (raw, unquote(raw))} - {""}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
