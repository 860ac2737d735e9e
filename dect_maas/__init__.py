"""dect-maas: Decoder Tuning for language models reachable only through an API.

Query the model once per example, keep its label-word scores and a vector for the input, and
train a small decoder locally (Cui et al., "Decoder Tuning", ACL 2023).
"""

from ._cache import CacheConfig, ResponseCache, cache_key
from ._exceptions import (
    AuthenticationError,
    BudgetExceeded,
    CacheError,
    CensoredScoreWarning,
    ConfigError,
    DectError,
    DectWarning,
    FeaturesError,
    MalformedResponse,
    MultiTokenLabelWarning,
    NotFittedError,
    ProviderError,
    ProviderStatusError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    TaskError,
    TransportError,
    UnsupportedCapability,
)
from ._features import FeatureMeta, Features
from ._ledger import BudgetLimits, Ledger, LedgerRecord, LedgerSummary, Usage
from ._task import Task

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "BudgetLimits",
    "CacheConfig",
    "CacheError",
    "CensoredScoreWarning",
    "ConfigError",
    "DectError",
    "DectWarning",
    "FeatureMeta",
    "Features",
    "FeaturesError",
    "Ledger",
    "LedgerRecord",
    "LedgerSummary",
    "MalformedResponse",
    "MultiTokenLabelWarning",
    "NotFittedError",
    "ProviderError",
    "ProviderStatusError",
    "QuotaExhausted",
    "RateLimited",
    "ResponseCache",
    "ServerError",
    "Task",
    "TaskError",
    "TransportError",
    "UnsupportedCapability",
    "Usage",
    "__version__",
    "cache_key",
]
