"""One home for secrets: which names may hold a credential, and how text is cleaned of them.

A key reaches dect-maas only through an environment variable named by ``api_key_env``. Anything
else that could carry one is refused where it comes in (a URL with user info or a credential in its
query string, a config key named like a credential, a cache key part with such a name) and masked
wherever text is shown or stored (exception messages, reprs, the ledger, logs). Refusing and
masking read the same list, :data:`CREDENTIAL_NAMES`; masking is one function, :func:`redact`
(:func:`mask_url` for one URL given on its own).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

__all__ = ["CREDENTIAL_NAMES", "MASK", "is_credential_name", "mask_url", "redact"]

MASK = "***"

# Names (compared lower-case, with '-' read as '_') that may hold a credential: HTTP headers
# (``Authorization``, ``x-api-key``, Google's ``x-goog-api-key``), query parameters of the APIs we
# know of (Google's ``key``, Azure SAS ``sig``, OAuth ``access_token``), and the usual config words.
CREDENTIAL_NAMES = frozenset(
    {
        "access_token",
        "api_key",
        "api_token",
        "apikey",
        "auth",
        "auth_token",
        "authorization",
        "bearer",
        "client_secret",
        "cookie",
        "hf_token",
        "key",
        "passwd",
        "password",
        "proxy_authorization",
        "pwd",
        "secret",
        "sig",
        "signature",
        "token",
        "x_api_key",
        "x_goog_api_key",
    }
)


def is_credential_name(name: str) -> bool:
    """Whether ``name`` (a header, parameter, field or config key) may hold a credential."""
    return name.lower().replace("-", "_") in CREDENTIAL_NAMES


def mask_url(url: str) -> str:
    """``url`` with any user/password, every query value and the fragment replaced by ``***``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@" + host + (f":{port}" if port is not None else "")
    query = "&".join(f"{k}={MASK}" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


# One alternative per name, '_' matching '-' too, longest first so "x_api_key" beats "key".
_NAMES = "|".join(
    n.replace("_", "[-_]") for n in sorted(CREDENTIAL_NAMES, key=lambda n: (-len(n), n))
)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_BARE_QUERY = re.compile(r"(?<![^\s'\"(\[])(/[^\s?'\"]*)\?([^\s#'\"]*=[^\s#'\"]*)")
_ASSIGNED = re.compile(rf"(?i)(?<![A-Za-z0-9])({_NAMES})=[^\s&#'\",;)]*")
_QUOTED = re.compile(rf"(?i)([\"'])({_NAMES})\1(\s*:\s*)([\"'])(?:(?!\4).)*\4")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")


def redact(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every credential we can recognise replaced by ``***``.

    Masked: the ``known`` secret values (e.g. the key just read from the environment), URLs' user
    info and query values, query values of bare paths (``/v1/x?key=...``), ``name=value`` and
    ``"name": "value"`` pairs whose name is in :data:`CREDENTIAL_NAMES`, and ``Bearer`` tokens.
    Text with none of these comes back unchanged.
    """
    for value in known:
        if value:
            text = text.replace(value, MASK)
    # Each pattern runs only where its marker is present: most texts (a plain endpoint URL, a
    # message with no pairs) pass through in well under a microsecond.
    if "://" in text and ("@" in text or "?" in text or "#" in text):
        text = _URL.sub(lambda m: _mask_in_text(m.group(0)), text)
    if "?" in text:
        text = _BARE_QUERY.sub(
            lambda m: m[1] + "?" + "&".join(f"{k}={MASK}" for k, _ in parse_qsl(m[2], True)),
            text,
        )
    if "=" in text:
        text = _ASSIGNED.sub(lambda m: f"{m.group(1)}={MASK}", text)
    if ":" in text and ('"' in text or "'" in text):
        text = _QUOTED.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{MASK}{m[4]}", text)
    if "bearer" in text.lower():
        text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return text


def _mask_in_text(url: str) -> str:
    if "@" not in url and "?" not in url and "#" not in url:
        return url  # the common case: a plain endpoint URL
    return mask_url(url)
