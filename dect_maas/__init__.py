"""dect-maas: Decoder Tuning for language models reachable only through an API.

Query the model once per example, keep its label-word scores and a vector for the input, and
train a small decoder locally (Cui et al., "Decoder Tuning", ACL 2023).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    AuthenticationError,
    BudgetExceeded,
    CacheError,
    CensoredScoreWarning,
    ConfigError,
    DectError,
    DectWarning,
    FeaturesError,
    Interrupted,
    LedgerError,
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
from ._metrics import accuracy, confusion_matrix, macro_f1, mean_std
from ._task import Task
from .adapters import (
    HFInferenceAdapter,
    LocalAdapter,
    OpenAIChatAdapter,
    OpenAICompatibleAdapter,
    Prices,
    TEIAdapter,
)
from .client.cache import CacheConfig, ResponseCache, cache_key
from .client.client import Client, Estimate
from .client.ledger import BudgetLimits, Ledger, LedgerRecord, LedgerSummary, Usage
from .client.settings import RateLimit, RetryPolicy
from .experiments.config_file import ExperimentConfig
from .experiments.data import Examples, load_examples, sample_k_shot
from .experiments.runner import Experiment, ExperimentResult

if TYPE_CHECKING:
    from .decoders.auto import AutoDecTClassifier
    from .decoders.baselines import LinearProbeClassifier, PrototypeClassifier, ZeroShotClassifier
    from .decoders.estimator import DecTClassifier

__version__ = "0.1.0"

# The estimators need torch, which takes seconds to import; the client, the ledger and the CLI's
# dry runs do not. These names are imported on first use (PEP 562), so `import dect_maas` is light.
_LAZY = {
    "AutoDecTClassifier": ".decoders.auto",
    "DecTClassifier": ".decoders.estimator",
    "LinearProbeClassifier": ".decoders.baselines",
    "PrototypeClassifier": ".decoders.baselines",
    "ZeroShotClassifier": ".decoders.baselines",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthenticationError",
    "AutoDecTClassifier",
    "BudgetExceeded",
    "BudgetLimits",
    "CacheConfig",
    "CacheError",
    "CensoredScoreWarning",
    "Client",
    "ConfigError",
    "DecTClassifier",
    "DectError",
    "DectWarning",
    "Estimate",
    "Examples",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "FeatureMeta",
    "Features",
    "FeaturesError",
    "HFInferenceAdapter",
    "Interrupted",
    "Ledger",
    "LedgerError",
    "LedgerRecord",
    "LedgerSummary",
    "LinearProbeClassifier",
    "LocalAdapter",
    "MalformedResponse",
    "MultiTokenLabelWarning",
    "NotFittedError",
    "OpenAIChatAdapter",
    "OpenAICompatibleAdapter",
    "Prices",
    "PrototypeClassifier",
    "ProviderError",
    "ProviderStatusError",
    "QuotaExhausted",
    "RateLimit",
    "RateLimited",
    "ResponseCache",
    "RetryPolicy",
    "ServerError",
    "TEIAdapter",
    "Task",
    "TaskError",
    "TransportError",
    "UnsupportedCapability",
    "Usage",
    "ZeroShotClassifier",
    "__version__",
    "accuracy",
    "cache_key",
    "confusion_matrix",
    "load_examples",
    "macro_f1",
    "mean_std",
    "sample_k_shot",
]
