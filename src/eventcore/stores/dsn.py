"""What a store URL may show: DSNs without their passwords, for messages, logs and `eventcore status`.

Imports no database driver, so every command can show a URL whatever backends are installed.
Redaction works on the text as written, by libpq's own rules for where a password sits (a URL's
userinfo runs from `//` to the first `@` before any `/`; query parameters are split on `&` and
percent-decoded), and changes nothing else: a URL without a secret comes back byte for byte
(`sqlite:////abs.db`, `memory://`, a `?host=/socket/dir`), which re-assembling a parsed URL does not
guarantee (an empty host loses its `//`, values get re-encoded).

A URL whose password holds an unencoded / # ? @ [ or ] is read differently by libpq and by
RFC 3986 (urllib): libpq ends the userinfo at the first `@` before any `/`, urllib at the last `@`
before the first `/`, `?` or `#`, so each would quote part of the password as a host, a port, a
database name or a query parameter. `check_url` refuses such a URL; redaction masks, in it,
everything either reading could take for a password.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

from ..errors import ValidationError

#: Connection parameters holding a secret: the password and the passphrase of the client's SSL key.
SECRET_PARAMS = ("password", "sslpassword")
#: A secret in libpq's key=value form: password=..., quoted or not, a backslash escaping the next character
#: either way (as libpq reads it), and any words after it that are not key=value (libpq refuses them,
#: quoting them: `password=two words` meant a password with a space).
_KEYWORD_SECRET = re.compile(
    r"\b((?:ssl)?password\s*=?\s*)"
    r"('(?:[^'\\]|\\[\s\S])*'?|(?:[^\s\\]|\\[\s\S]|\\\Z)*)"
    r"((?:\s+(?:[^\s\\=]|\\[\s\S])+(?=\s|\Z)(?!\s*=))*)",
    re.IGNORECASE)
#: Where a parser may cut a misread password into pieces it then quotes (a host, a port, a path...).
_PIECES = re.compile(r"[/#?@:\[\]&=]")
MASK = "***"

#: The PostgreSQL schema a store lives in unless ?schema= (or schema=) names another.
DEFAULT_SCHEMA = "eventcore"


def scheme(dsn: str) -> str:
    """The URL's scheme, lower case ("none" for libpq's key=value form): safe to show, never the whole string."""
    return dsn.split("://", 1)[0].lower() if "://" in dsn else "none"


def _userinfo_span(dsn: str) -> tuple[int, int] | None:
    """(start, end) of the userinfo of a URL as libpq reads it (the text before the first '@' before any
    '/'), or None when it has none."""
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


def _ambiguous(dsn: str) -> bool:
    """Whether libpq and another reading of the URL may disagree on where its password ends.

    libpq's userinfo ends at the first '@' before any '/'; urllib's at the last '@' before the first
    '/', '?' or '#'; a person may mean the last '@' of all. They agree when libpq's userinfo holds none
    of # ? [ ] (it cannot hold '/' or '@') and no '@' follows it; a URL in which libpq finds no userinfo
    has no password to misread unless a ':' comes before an '@' (`app:pass/word@host`: libpq reads a
    host `app`, a port `pass` and a database `word@host`). A URL without an authority
    (`postgresql:///db`) has no password at all.
    """
    start = dsn.index("://") + 3
    if dsn.startswith("/", start) or start == len(dsn):
        return False
    userinfo = _userinfo_span(dsn)
    if userinfo is None:
        return ":" in dsn[start:max(dsn.rfind("@", start), start)]
    return any(c in dsn[userinfo[0]:userinfo[1]] for c in "#?[]") or "@" in dsn[userinfo[1] + 1:]


def check_url(url: str) -> None:
    """ValidationError, quoting nothing of the URL, unless libpq, urllib and a person agree on where its
    password ends (see `_ambiguous`)."""
    if "://" in url and _ambiguous(url):
        raise ValidationError(
            f"malformed {scheme(url)}:// URL: where its password ends is ambiguous; percent-encode / # ? @ [ ] "
            "in the user name and password (as %2F %23 %3F %40 %5B %5D), and every '@' after them"
        )


def _query_secret_spans(dsn: str, query: int) -> list[tuple[int, int]]:
    spans = []
    pos = query
    for pair in dsn[query:].split("&"):
        key, eq, _ = pair.partition("=")
        if eq and unquote(key).strip().lower() in SECRET_PARAMS:
            spans.append((pos + len(key) + 1, pos + len(pair)))
        pos += len(pair) + 1
    return spans


def _url_secret_spans(dsn: str) -> list[tuple[int, int]]:
    """(start, end) of each secret in a URL, in order and not overlapping: the userinfo's password and
    secret query values; in an ambiguous URL (see `_ambiguous`), also everything from the first ':' to
    the last '@' and the secret values of every query either reading could find."""
    spans = []
    start = dsn.index("://") + 3
    userinfo = _userinfo_span(dsn)
    queries = {_query_start(dsn, start)}
    if userinfo is not None:
        colon = dsn.find(":", userinfo[0], userinfo[1])
        if colon >= 0:
            spans.append((colon + 1, userinfo[1]))
        queries = {_query_start(dsn, userinfo[1] + 1)}
    if _ambiguous(dsn):
        last_at = dsn.rfind("@", start)
        colon = dsn.find(":", start, last_at)
        if colon >= 0:
            spans.append((colon + 1, last_at))
        queries |= {_query_start(dsn, start), _query_start(dsn, last_at + 1)}
    for query in queries - {None}:
        spans += _query_secret_spans(dsn, query)
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def redact(dsn: str) -> str:
    """The DSN (a URL or libpq's key=value form) with its passwords replaced by ***, nothing else changed."""
    if "://" not in dsn:
        return _KEYWORD_SECRET.sub(rf"\1{MASK}", dsn)
    out = dsn
    for start, end in reversed(_url_secret_spans(dsn)):
        out = out[:start] + MASK + out[end:]
    return out


def without_secrets(text: str, dsn: str) -> str:
    """`text` (e.g. a message of libpq's, which may quote the URL or one of its values) with the DSN's
    passwords, as written and percent-decoded, replaced by *** (in an ambiguous URL, also each piece a
    parser could have cut them into)."""
    if "://" in dsn:
        secrets = [dsn[start:end] for start, end in _url_secret_spans(dsn)]
        if _ambiguous(dsn):
            secrets += [piece for secret in secrets for piece in _PIECES.split(secret)]
    else:
        secrets = []
        for m in _KEYWORD_SECRET.finditer(dsn):
            value, words = m.group(2), m.group(3)
            unquoted = value.strip("'")
            secrets += [value + words, value, unquoted, re.sub(r"\\([\s\S])", r"\1", unquoted), *words.split()]
    for secret in sorted({s for raw in secrets for s in (raw, unquote(raw))} - {""}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text

