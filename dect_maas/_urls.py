"""Endpoint URLs: refuse ones that carry a credential, and mask them wherever they are shown.

A key belongs in an environment variable named by ``api_key_env``; in a URL it would be sent as
HTTP Basic auth instead of the configured key, and end up in logs, reports, ledgers and cache
metadata. So ``http://user:pass@host`` and ``?api_key=...`` are refused like an inline key, and the
message shows the URL with those parts masked. Which names count as credentials, and the masking,
live in :mod:`dect_maas._secrets`. A base URL gets paths appended to it, so any other query string
or fragment is refused too: it could only produce wrong URLs.
"""

from __future__ import annotations

import functools
from urllib.parse import parse_qsl, urlsplit

from ._exceptions import ConfigError
from ._secrets import is_credential_name, mask_url

__all__ = ["check_base_url", "mask_url", "url_problem"]


@functools.lru_cache(maxsize=256)
def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a base URL (in words that never quote it), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or too big
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if "@" in parts.netloc:
        return (
            "carries credentials (user:password@); inline credentials are refused: put the key "
            "in an environment variable and give its name as api_key_env"
        )
    if any(is_credential_name(k) for k, _ in parse_qsl(parts.query, True)):
        return (
            "carries a credential in its query string; inline credentials are refused: put the "
            "key in an environment variable and give its name as api_key_env"
        )
    if parts.query or parts.fragment:
        return "must not have a query string or fragment (request paths are appended to it)"
    return None


def check_base_url(url: str, key: str) -> str:
    """``url`` unchanged if it is a plain endpoint; else a ConfigError naming ``key``.

    The message shows the URL masked (:func:`mask_url`), never as given.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{key} must be a URL string, got {type(url).__name__}")
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"{key} {mask_url(url)} {problem}")
    return url
