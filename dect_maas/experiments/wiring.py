"""From a validated experiment config to the objects that do the work: adapter, client, estimator.

Each is one table: ``[provider]`` to an adapter, the provider, budget, cache and ledger sections
to a ``Client``, a method name to an estimator. Nothing here sends a request or trains a model;
the runner (``experiments/runner.py``) and ``dect-maas predict`` call these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx

from dect_maas._exceptions import ConfigError, TransportError
from dect_maas.adapters import (
    Adapter,
    HFInferenceAdapter,
    LocalAdapter,
    OpenAIChatAdapter,
    OpenAICompatibleAdapter,
    Prices,
    TEIAdapter,
)
from dect_maas.client.budget import BudgetLimits
from dect_maas.client.cache import CacheConfig
from dect_maas.client.client import CONNECT_TIMEOUT_S, Client
from dect_maas.client.retry import is_connect_failure
from dect_maas.client.settings import RateLimit, RetryPolicy

from .config_file import ExperimentConfig, ProviderSection

if TYPE_CHECKING:
    from dect_maas.decoders.estimator import FeatureClassifier

__all__ = ["api_keys", "build_client", "explain_unreachable", "make_adapter", "make_estimator"]


def build_client(config: ExperimentConfig, run_id: str) -> Client:
    """A Client for the config's provider with its cache, ledger, budget, rate limit, retries."""
    p = config.provider
    return Client(
        make_adapter(p),
        cache=CacheConfig(config.cache_dir),
        ledger=config.ledger_dir,
        budget=BudgetLimits(**config.budget.model_dump()),
        rate_limit=RateLimit(
            requests_per_minute=p.requests_per_minute, tokens_per_minute=p.tokens_per_minute
        ),
        retry=RetryPolicy(max_attempts=p.max_attempts, connect_retry_s=p.connect_retry_s),
        max_concurrency=p.max_concurrency,
        run_id=run_id,
        api_key_env=api_keys(p),
        # a read may take minutes on a busy model server; a dead host should not
        timeout=httpx.Timeout(p.timeout_s, connect=min(CONNECT_TIMEOUT_S, p.timeout_s)),
    )


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0")


def explain_unreachable(exc: BaseException, p: ProviderSection) -> BaseException:
    """A connection failure said as a user can act on it: the URL nothing answers at, and the
    server to start (this project's, for ``kind = "local"``) or the setting to check. Any other
    error is returned as it is."""
    if not is_connect_failure(exc) or not isinstance(exc, TransportError):
        return exc
    parts = (exc.request or "").split()
    url = parts[1] if len(parts) > 1 else (p.base_url or "")
    setting = "provider.base_url"
    on_vectors = bool(p.embeddings_base_url) and url.startswith(
        (p.embeddings_base_url or "").rstrip("/")
    )
    if on_vectors and not (p.base_url and url.startswith(p.base_url.rstrip("/"))):
        setting = "provider.embeddings_base_url"
    if p.kind == "local":
        u = httpx.URL(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        if u.host in _LOOPBACK:
            fix = f"start the local server with `dect-maas serve --port {port}`"
        else:
            fix = f"start `dect-maas serve --host 0.0.0.0 --port {port}` on {u.host}"
        what = f"{fix} (or correct {setting})"
    else:
        what = f"start the server there, or correct {setting}"
    cause = exc.__cause__
    why = type(cause).__name__ if cause is not None else "connection failed"
    return TransportError(f"nothing answers at {url} ({why}): {what}")


def api_keys(p: ProviderSection) -> str | dict[str, str | None] | None:
    """The key variable per endpoint role: one name (the client sends it to the vectors endpoint
    only on the scores endpoint's host), or a table when the vectors key is named apart."""
    if p.kind == "embeddings":
        env = p.embeddings_api_key_env or p.api_key_env
        return {"scores": None, "vectors": env} if env else None
    if p.embeddings_api_key_env is not None:
        return {"scores": p.api_key_env, "vectors": p.embeddings_api_key_env}
    return p.api_key_env


def make_adapter(p: ProviderSection) -> Adapter:
    """The one table from the provider section to an adapter."""
    prices = Prices(
        per_million_input_tokens=p.price_per_million_input_tokens or 0.0,
        per_request=p.price_per_request or 0.0,
        per_million_output_tokens=p.price_per_million_output_tokens or 0.0,
    )
    vector_prices = Prices(
        per_million_input_tokens=(
            p.embeddings_price_per_million_input_tokens
            if p.embeddings_price_per_million_input_tokens is not None
            else prices.per_million_input_tokens
        ),
        per_request=(
            p.embeddings_price_per_request
            if p.embeddings_price_per_request is not None
            else prices.per_request
        ),
    )
    opt: dict[str, Any] = {}
    if p.label_token_ids is not None:
        if p.kind not in ("local", "openai", "openai_chat"):
            raise ConfigError(
                f"provider.label_token_ids: the {p.kind} provider takes no token ids "
                "(hf_inference scores label words by their text, tei gives no scores); remove it"
            )
        opt["label_token_ids"] = {k: tuple(v) for k, v in p.label_token_ids.items()}
    if p.pooling is not None and p.kind in ("openai", "openai_chat", "embeddings", "hf_inference"):
        opt["pooling"] = p.pooling
    if p.embeddings_batch_size is not None and p.kind in ("openai", "openai_chat", "embeddings"):
        opt["max_embedding_inputs"] = p.embeddings_batch_size
    if p.kind == "embeddings":
        base = p.embeddings_base_url or p.base_url
        model = p.embeddings_model or p.model
        assert base is not None
        assert model is not None  # validated by ProviderSection
        return OpenAICompatibleAdapter(
            base_url=base,
            model=model,
            scores=False,
            embeddings_base_url=base,
            embeddings_model=model,
            embeddings_prices=vector_prices,
            tokenize_api="none",
            **opt,
        )
    if p.kind == "local":
        assert p.base_url is not None  # validated by ProviderSection
        if p.max_prompts_per_request is not None:
            opt["max_inputs_per_request"] = p.max_prompts_per_request
        if p.mask_token is not None:
            opt["mask_token"] = p.mask_token
        return LocalAdapter(base_url=p.base_url, model=p.model or "local", prices=prices, **opt)
    if p.kind in ("openai", "openai_chat"):
        assert p.base_url is not None
        assert p.model is not None
        if p.top_k is not None:
            opt["top_logprobs"] = p.top_k
        if p.tokenize_api is not None:
            opt["tokenize_api"] = p.tokenize_api
        common: dict[str, Any] = dict(
            base_url=p.base_url,
            model=p.model,
            exact_token_ids=p.exact_token_ids,
            embeddings_model=p.embeddings_model,
            embeddings_base_url=p.embeddings_base_url,
            prices=prices,
            embeddings_prices=vector_prices,
        )
        if p.kind == "openai_chat":
            if p.combine_forms == "as-written":
                opt["surface_forms"] = False
            elif p.combine_forms is not None:
                opt["combine"] = p.combine_forms
            try:
                return OpenAIChatAdapter(system=p.system_prompt, **common, **opt)
            except ValueError as exc:  # top_logprobs above the chat cap
                raise ConfigError(f"provider.top_k: {exc}") from None
        if p.max_prompts_per_request is not None:
            opt["max_prompts_per_request"] = p.max_prompts_per_request
        return OpenAICompatibleAdapter(**common, **opt)
    if p.kind == "hf_inference":
        assert p.model is not None
        if p.mask_token is not None:
            opt["mask_token"] = p.mask_token
        return HFInferenceAdapter(
            model=p.model,
            base_url=p.base_url,
            embeddings_model=p.embeddings_model,
            embeddings_base_url=p.embeddings_base_url,
            prices=prices,
            **opt,
        )
    assert p.base_url is not None
    if p.max_prompts_per_request is not None:
        opt["max_inputs_per_request"] = p.max_prompts_per_request
    return TEIAdapter(base_url=p.base_url, model=p.model or "tei", prices=prices, **opt)


def make_estimator(
    method: str, config: ExperimentConfig, train_labels: Sequence[str] = ()
) -> FeatureClassifier:
    """The one table from method names to estimators.

    ``train_labels`` are the whole training file's labels, for ``decoder.class_prior`` "auto"
    (the default) and "train".
    """
    # The one import inside a function: the estimators load torch, which the client, the
    # ledger and the CLI's dry runs (`dect-maas estimate`) never need.
    from dect_maas.decoders.auto import AutoDecTClassifier
    from dect_maas.decoders.baselines import (
        LinearProbeClassifier,
        PrototypeClassifier,
        ZeroShotClassifier,
    )
    from dect_maas.decoders.estimator import DecTClassifier

    d = config.decoder
    decoder_args: dict[str, Any] = {
        "projection_dim": d.projection_dim,
        "n_steps": d.n_steps,
        "lr": d.lr,
        "normalize": d.normalize,
        "random_state": d.random_state,
    }
    cal = "auto" if d.calibration == "none" else d.calibration
    factories: dict[str, Callable[[], FeatureClassifier]] = {
        "dect": lambda: DecTClassifier(
            prompt_weight=d.prompt_weight, calibration=d.calibration, **decoder_args
        ),
        "auto_dect": lambda: AutoDecTClassifier(
            projection_dim=d.projection_dim,
            random_state=d.random_state,
            class_prior=_class_prior(d.class_prior, train_labels, list(config.task.label_words)),
        ),
        "zero_shot": lambda: ZeroShotClassifier(calibration="none"),
        "calibrated_zero_shot": lambda: ZeroShotClassifier(calibration=cal),
        "prototype": lambda: PrototypeClassifier(**decoder_args),
        "linear_probe": lambda: LinearProbeClassifier(),
    }
    try:
        return factories[method]()
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose from {sorted(factories)}") from None


def _class_prior(
    setting: Literal["auto", "none", "train"] | dict[str, float],
    train_labels: Sequence[str],
    classes: Sequence[str] = (),
) -> dict[str, float] | None:
    """The class mix that ``decoder.class_prior`` gives auto DecT, as label counts, or None.

    "auto" is "train" where the training file has an example of every class in ``classes`` (its
    mix is then the best guess at the mix in use: the k-shot sets are balanced by construction
    and cannot show it), and None otherwise (no training labels, or a class missing).
    """
    if isinstance(setting, dict):
        return dict(setting)
    if setting == "none":
        return None
    if setting in ("auto", "train"):
        counts = Counter(str(v) for v in train_labels)
        missing = [c for c in classes if c not in counts]
        if setting == "auto":
            return None if not counts or missing else {k: float(v) for k, v in counts.items()}
        if not counts:
            raise ConfigError('decoder.class_prior = "train" needs the training labels')
        if missing:
            raise ConfigError(
                f'decoder.class_prior = "train": the training file has no example of {missing}; '
                'give the mix as a table { class = weight } or use "none"'
            )
        return {k: float(v) for k, v in counts.items()}
    raise ConfigError(
        f'decoder.class_prior must be "auto", "train", "none" or a table, not {setting!r}'
    )
