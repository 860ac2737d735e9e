"""The exception tree of dect-maas.

    DectError
    ├── ConfigError(ValueError)            bad settings, config files, data files
    │   └── TaskError                      an invalid Task
    ├── FeaturesError(ValueError)          arrays of the wrong shape, dtype or with NaN/inf
    ├── NotFittedError(ValueError, AttributeError)
    ├── UnsupportedCapability(ValueError)  raised before any I/O
    ├── BudgetExceeded                     raised before any I/O
    ├── CacheError                         the on-disk cache cannot be used or written
    ├── LedgerError                        the ledger cannot be read or written (disk full, damaged)
    ├── Interrupted                        SIGINT/SIGTERM: sending stopped, in-flight work settled
    └── ProviderError                      something went wrong talking to a provider
        ├── TransportError                 connect/read/write errors and timeouts
        ├── MalformedResponse              a 2xx body that does not have the expected shape
        └── ProviderStatusError            a non-2xx answer
            ├── RateLimited                429 that may succeed later (carries retry_after)
            ├── QuotaExhausted             429/402: quota or credit spent, never retried
            ├── AuthenticationError        401/403
            └── ServerError                5xx

Custom exceptions also inherit from the built-ins users already catch (sklearn's habit).
Messages never contain credentials: they are built from our own request specs, which hold none,
and every message (and a provider error's ``request``) still goes through
:func:`dect_maas._secrets.redact` on the way in, for the provider text and URLs they quote.
"""

from __future__ import annotations

import warnings

from ._secrets import redact

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "CacheError",
    "CensoredScoreWarning",
    "ConfigError",
    "DectError",
    "DectWarning",
    "FeaturesError",
    "Interrupted",
    "LedgerError",
    "MalformedResponse",
    "MultiTokenLabelWarning",
    "NotFittedError",
    "ProviderError",
    "ProviderStatusError",
    "QuotaExhausted",
    "RateLimited",
    "ServerError",
    "TaskError",
    "TransportError",
    "UnsupportedCapability",
]


class DectError(Exception):
    """Root of every error raised by dect-maas. Its text arguments are redacted when it is made."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(DectError, ValueError):
    """Invalid settings, configuration file or data file."""


class TaskError(ConfigError):
    """A Task that cannot be used (no text slot, duplicate classes, ...)."""


class FeaturesError(DectError, ValueError):
    """Feature arrays with a wrong shape, dtype or non-finite values."""


class NotFittedError(DectError, ValueError, AttributeError):
    """An estimator was used before `fit`."""


class UnsupportedCapability(DectError, ValueError):
    """The provider cannot serve what the task or the settings ask for; nothing was sent."""


class BudgetExceeded(DectError):
    """A request would break a budget limit; it was not sent.

    Attributes name the limit ("queries", "requests", "input_tokens" or "cost_usd") and the
    amounts spent, reserved by requests in flight, asked for by this request, and allowed.
    """

    def __init__(
        self, limit: str, *, spent: float, reserved: float, asked: float, allowed: float
    ) -> None:
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.asked = asked
        self.allowed = allowed
        super().__init__(
            f"budget limit on {limit} would be exceeded: spent {_num(spent)}, "
            f"reserved by requests in flight {_num(reserved)}, this request asks {_num(asked)}, "
            f"limit {_num(allowed)}. Nothing was sent; raise the limit or query fewer examples "
            "(cached examples cost nothing)."
        )


class CacheError(DectError):
    """The response cache cannot be opened, read or written (schema mismatch, corrupt entry,
    disk full); the message names the cache's folder."""


class LedgerError(DectError):
    """The ledger cannot be read or written (disk full, damaged or emptied file); the message
    names its file. Raised instead of sending: a request that cannot be recorded is not sent."""


class Interrupted(DectError):
    """A signal (SIGINT, SIGTERM) stopped the run: nothing new was sent, requests in flight were
    finished (or timed out), stored and settled. ``signum`` is the signal's number."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        super().__init__(message)


class ProviderError(DectError):
    """A request to a provider failed. `request` describes it (method, URL path, examples)."""

    def __init__(self, message: str, *, request: str | None = None) -> None:
        self.request = redact(request) if request else request
        super().__init__(f"{message} [{self.request}]" if request else message)


class TransportError(ProviderError):
    """The request could not be completed on the network (connect, read, write, timeout)."""


class MalformedResponse(ProviderError):
    """The provider answered, but the body is not what its API documents."""


class ProviderStatusError(ProviderError):
    """The provider answered with a non-success status."""

    def __init__(self, message: str, *, status: int, request: str | None = None) -> None:
        self.status = status
        super().__init__(message, request=request)


class RateLimited(ProviderStatusError):
    """429 (or 503 with Retry-After): try again after `retry_after` seconds, when given."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        retry_after: float | None = None,
        request: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status, request=request)


class QuotaExhausted(ProviderStatusError):
    """The account's quota or credit is spent (e.g. 429 `insufficient_quota`). Never retried."""


class AuthenticationError(ProviderStatusError):
    """401/403: the credential is missing, wrong or not allowed. Never retried."""


class ServerError(ProviderStatusError):
    """5xx from the provider."""


class DectWarning(UserWarning):
    """Base of the non-fatal conditions dect-maas reports."""


class CensoredScoreWarning(DectWarning):
    """Some label-word scores are only upper bounds (the word fell outside the API's top-k)."""


class MultiTokenLabelWarning(DectWarning):
    """A label word spans several tokens; only its first token is scored."""


def _num(x: float) -> str:
    return f"{x:.6g}"


def warn(category: type[DectWarning], message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, category, stacklevel=stacklevel)
