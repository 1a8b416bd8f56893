"""Credentials out of URLs, for every status, error, response and log line that shows one.

:func:`redact_url` hides a URL's userinfo (``rtsp://user:pass@h`` -> ``rtsp://***@h``) and the
values of password- and token-like query parameters; :func:`redact` does that to every URL in
a text (an error message, say). Camera URLs (``server/ingest.py``, ``server/frames.py``) and the
Redis URL (``server/cache.py``) both go through here.

Users do not always percent-encode a password, so the userinfo is taken to run to the last
``@`` that can end one: a password holding ``@``, ``/``, ``?`` or ``#`` leaks nothing (a path or
query holding ``@`` behind a ``user:`` or ``host:port`` authority is hidden with it: the safe
side of an ambiguous URL). An ``@`` after a plain host (``http://h/p/@me``, ``?mail=a@b.c``) is
not a credential and stays. What follows the userinfo goes through ``urllib.parse.urlsplit``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

HIDDEN = "***"
SECRET_PARAMS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "token",
        "access_token",
        "auth",
        "key",
        "api_key",
        "apikey",
        "secret",
        "signature",
        "sig",
    }
)
# a URL inside a text: a scheme, "://", and everything up to the next blank
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
_FIRST_SEP = re.compile(r"[/?#]")


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of ``rest`` (a URL after its ``scheme://``) ends: the index of its
    ``@``, or -1 when it has none. The last ``@`` whose text before it starts as a userinfo does
    (``user:...``, or a ``user`` with no ``/``, ``?`` or ``#`` at all): a password may hold ``/``,
    ``?``, ``#`` and ``@`` unencoded, and ``?mail=a@b.c`` behind a plain host is no credential.
    So: the last ``@`` when the text up to the first ``/``, ``?`` or ``#`` holds a ``:``, else the
    last ``@`` before that first one (one pass, however many ``@`` the URL holds)."""
    sep = _FIRST_SEP.search(rest)
    end = len(rest) if sep is None else sep.start()
    return rest.rfind("@") if ":" in rest[:end] else rest.rfind("@", 0, end)


# a parameter named like these at its end is a secret too: access_token, x-amz-signature, apiKey
_SECRET_ENDINGS = ("token", "password", "passwd", "secret", "key", "signature")


def _is_secret(param: str) -> bool:
    name = param.lower()
    return name in SECRET_PARAMS or name.endswith(_SECRET_ENDINGS)


def _hide_params(query: str) -> str:
    def one(pair: str) -> str:
        key, eq, _ = pair.partition("=")
        return f"{key}={HIDDEN}" if eq and _is_secret(unquote_plus(key)) else pair

    return "&".join(one(p) for p in query.split("&"))


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret query values replaced by ``***``; a path, device
    index or URL without credentials comes back unchanged (the same string)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _userinfo_end(rest)
    if end >= 0:
        rest = f"{HIDDEN}@{rest[end + 1 :]}"
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:  # e.g. an unbalanced "[": no structure to trust but the query's "?"
        head, q, tail = rest.partition("?")
        query, h, fragment = tail.partition("#")
        return f"{scheme}://{head}{q}{_hide_params(query) if q else ''}{h}{fragment}"
    query = _hide_params(parts.query)
    if end < 0 and query == parts.query:
        return url
    out = urlunsplit(parts._replace(query=query))
    # urlunsplit drops an empty "?" or "#"; keep the text as it was apart from the secrets
    if rest.endswith(("?", "#")) and not out.endswith(rest[-1]):
        out += rest[-1]
    return out


def redact(text: str) -> str:
    """``text`` with :func:`redact_url` applied to every URL in it."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
