"""Access log lines without query strings (and no request URLs from the HTTP client libraries).

uvicorn's access log writes each request's path with its query string, so a token a client sends
as ``?token=...`` (or any other secret in a query) would land in the daemon's log. The filter
here rewrites each ``uvicorn.access`` record to its path alone, before any handler formats it;
the route, method and status stay, which is what an access log is read for.
"""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"


def _path_only(target: object) -> object:
    return target.split("?", 1)[0] if isinstance(target, str) else target


class NoQueryStrings(logging.Filter):
    """Drops the query string from the request target of an access log record (uvicorn passes it
    as the third argument: client, method, path with query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:
            record.args = (*args[:2], _path_only(args[2]), *args[3:])
        elif isinstance(record.msg, str) and "?" in record.msg and not args:
            record.msg = " ".join(w.split("?", 1)[0] if w.startswith("/") else w for w in record.msg.split(" "))
        return True


HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")


def quiet_http_clients() -> None:
    """Only warnings from the HTTP client libraries: httpx logs every request it sends at INFO
    with its whole URL, so a reader process forwarding ``/healthz?token=...`` to the daemon would
    write the token to the log (the daemon's own access log shows the forwarded request, without
    its query string)."""
    for name in HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def strip_query_strings(logger_name: str = ACCESS_LOGGER) -> NoQueryStrings:
    """Install :class:`NoQueryStrings` on the access logger (once; call it after ``uvicorn.Config``,
    which configures that logger's handlers and keeps its filters)."""
    logger = logging.getLogger(logger_name)
    for f in logger.filters:
        if isinstance(f, NoQueryStrings):
            return f
    f = NoQueryStrings()
    logger.addFilter(f)
    return f
