"""The public surface: the exported names are pinned, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import dect_maas

EXPORTED = {
    # values and errors
    "Task", "Features", "FeatureMeta", "Examples", "load_examples", "sample_k_shot",
    "DectError", "ConfigError", "TaskError", "FeaturesError", "NotFittedError",
    "UnsupportedCapability", "BudgetExceeded", "CacheError", "LedgerError",
    "Interrupted", "ProviderError", "TransportError",
    "MalformedResponse", "ProviderStatusError", "RateLimited", "QuotaExhausted",
    "AuthenticationError", "ServerError", "DectWarning", "CensoredScoreWarning",
    "MultiTokenLabelWarning",
    # querying and paying
    "Client", "Estimate", "RetryPolicy", "RateLimit", "Prices", "LocalAdapter",
    "OpenAICompatibleAdapter", "OpenAIChatAdapter", "HFInferenceAdapter", "TEIAdapter",
    "CacheConfig", "ResponseCache", "cache_key", "BudgetLimits", "Usage", "Ledger", "LedgerRecord",
    "LedgerSummary",
    # decoders and evaluation
    "DecTClassifier", "AutoDecTClassifier", "ZeroShotClassifier", "PrototypeClassifier",
    "LinearProbeClassifier", "accuracy", "macro_f1", "confusion_matrix", "mean_std",
    # experiments
    "Experiment", "ExperimentConfig", "ExperimentResult",
    "__version__",
}  # fmt: skip


def test_exported_names_are_pinned_and_all_resolve() -> None:
    assert set(dect_maas.__all__) == EXPORTED
    assert len(dect_maas.__all__) == len(EXPORTED)  # no name listed twice
    for name in EXPORTED:
        assert getattr(dect_maas, name) is not None
    assert set(EXPORTED) <= set(dir(dect_maas))


def test_importing_the_package_does_not_import_torch() -> None:
    # The client, the ledger and the CLI's dry runs need no torch; the estimators load it on use.
    code = (
        "import sys, dect_maas; assert 'torch' not in sys.modules; "
        "from dect_maas import DecTClassifier; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
