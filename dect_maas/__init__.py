"""dect-maas: Decoder Tuning for language models reachable only through an API.

Query the model once per example, keep its label-word scores and a vector for the input, and
train a small decoder locally (Cui et al., "Decoder Tuning", ACL 2023).
"""

from ._auto import AutoDecTClassifier
from ._baselines import LinearProbeClassifier, PrototypeClassifier, ZeroShotClassifier
from ._cache import CacheConfig, ResponseCache, cache_key
from ._client import Client, Estimate
from ._config import RateLimit, RetryPolicy
from ._config_file import ExperimentConfig
from ._data import Examples, load_examples, sample_k_shot
from ._estimator import DecTClassifier
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
from ._experiment import Experiment, ExperimentResult
from ._features import FeatureMeta, Features
from ._ledger import BudgetLimits, Ledger, LedgerRecord, LedgerSummary, Usage
from ._metrics import accuracy, confusion_matrix, macro_f1, mean_std
from ._task import Task
from .adapters import (
    HFInferenceAdapter,
    LocalAdapter,
    OpenAICompatibleAdapter,
    Prices,
    TEIAdapter,
)

__version__ = "0.1.0"

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
    "Ledger",
    "LedgerRecord",
    "LedgerSummary",
    "LinearProbeClassifier",
    "LocalAdapter",
    "MalformedResponse",
    "MultiTokenLabelWarning",
    "NotFittedError",
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
