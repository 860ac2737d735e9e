"""Experiment configuration files (TOML, or YAML where PyYAML is installed), validated by pydantic.

Every section is a frozen pydantic model with ``extra="forbid"``: a misspelled key is an error,
not a silently ignored setting. Errors are raised as one :class:`ConfigError` naming the file and
the key path (``provider.base_url``), never echoing the offending value (it might be a credential).

Relative paths (data files, cache, ledger and output folders) are resolved against the folder of the
config file, so a config works from whatever directory it is run in.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dect_maas._exceptions import ConfigError
from dect_maas._secrets import is_credential_name, mask_url
from dect_maas._task import Task
from dect_maas._urls import url_problem
from dect_maas.client.storage import is_database_url, parse_database_url

from .data import read_text
from .input_config import BBTSection, ICLSection

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__all__ = [
    "METHOD_NAMES",
    "BudgetSection",
    "DataSection",
    "DataSource",
    "DecoderSection",
    "ExperimentConfig",
    "ProviderSection",
    "TaskSection",
    "load_config",
]

MethodName = Literal[
    "dect",
    "auto_dect",
    "zero_shot",
    "calibrated_zero_shot",
    "prototype",
    "linear_probe",
    # input-side methods (docs/input_side.md), asked for by name
    "icl",
    "calibrated_icl",
    "bbt",
]
# The default methods: the paper's DecT and the baselines. "auto_dect" (AutoDecTClassifier,
# settings chosen by cross-validation on the training shots) is asked for by name.
METHOD_NAMES: tuple[MethodName, ...] = (
    "dect",
    "zero_shot",
    "calibrated_zero_shot",
    "prototype",
    "linear_probe",
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_HOME = Path("~/.cache/dect-maas")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ProviderSection(_Section):
    """Where the model is and how to reach it. Credentials only by environment-variable name.

    ``kind``: ``local`` (this project's server), ``openai`` (OpenAI-compatible completions with
    logprobs: OpenAI, vLLM, llama.cpp, ...; vectors from ``embeddings_base_url``/``_model``),
    ``openai_chat`` (the same through chat completions: most hosted models), ``embeddings``
    (an OpenAI-compatible ``/embeddings`` endpoint alone, for models with no logprobs),
    ``hf_inference`` (fill-mask + feature-extraction) or ``tei`` (text-embeddings-inference:
    vectors only, so only the prototype decoder and the linear probe apply).

    The scores endpoint uses ``base_url``, ``model``, ``api_key_env`` and the ``price_*`` keys;
    the vectors endpoint the ``embeddings_*`` ones, each defaulting to the scores endpoint's
    (a key goes to the vectors endpoint only when it is on the same host, or named for it).
    """

    kind: Literal["local", "openai", "openai_chat", "embeddings", "hf_inference", "tei"] = "local"
    base_url: str | None = None
    model: str | None = None
    embeddings_base_url: str | None = None
    embeddings_model: str | None = None
    api_key_env: str | None = None
    embeddings_api_key_env: str | None = None
    top_k: int | None = Field(default=None, ge=1)
    exact_token_ids: bool = False
    tokenize_api: Literal["llama-cpp-python", "vllm", "llama.cpp", "dect-maas", "none"] | None = (
        None
    )
    system_prompt: str | None = None
    combine_forms: Literal["logsumexp", "max", "as-written"] | None = None
    embeddings_batch_size: int | None = Field(default=None, ge=1)
    label_token_ids: dict[str, list[int]] | None = None
    mask_token: str | None = None
    pooling: Literal["mean", "last"] | None = None
    max_prompts_per_request: int | None = Field(default=None, ge=1)
    price_per_million_input_tokens: float | None = Field(default=None, ge=0)
    price_per_request: float | None = Field(default=None, ge=0)
    price_per_million_output_tokens: float | None = Field(default=None, ge=0)
    embeddings_price_per_million_input_tokens: float | None = Field(default=None, ge=0)
    embeddings_price_per_request: float | None = Field(default=None, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
    max_concurrency: int = Field(default=4, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    # refused connections at a server that has answered: retried this long (a restart)
    connect_retry_s: float = Field(default=60.0, ge=0)

    @field_validator("api_key_env", "embeddings_api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            # Never echo the value: someone may have pasted the key itself here.
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits and _), "
                "not the key itself"
            )
        return v

    @model_validator(mode="after")
    def _needs(self) -> ProviderSection:
        if self.kind == "embeddings":
            if self.base_url is None and self.embeddings_base_url is None:
                raise ValueError("kind 'embeddings' needs embeddings_base_url (or base_url)")
            if not (self.embeddings_model or self.model):
                raise ValueError("kind 'embeddings' needs embeddings_model (or model)")
            return self
        if self.kind in ("local", "openai", "openai_chat", "tei") and self.base_url is None:
            raise ValueError(f"kind {self.kind!r} needs base_url")
        if self.kind in ("openai", "openai_chat", "hf_inference") and not self.model:
            raise ValueError(f"kind {self.kind!r} needs model (the name the endpoint serves)")
        if self.kind != "openai_chat" and (self.system_prompt or self.combine_forms):
            raise ValueError("system_prompt and combine_forms apply to kind 'openai_chat' only")
        return self

    @field_validator("base_url", "embeddings_base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        problem = url_problem(v) if v is not None else None
        if problem is not None:
            raise ValueError(f"{mask_url(v or '')} {problem}")  # masked: it may hold a key
        return v.rstrip("/") if v is not None else v


class TaskSection(_Section):
    """The prompt and the classes; becomes a :class:`Task`."""

    name: str = "task"
    template: str
    label_words: dict[str, list[str] | str]
    label_word_prefix: str = " "

    @model_validator(mode="after")
    def _valid_task(self) -> TaskSection:
        self.to_task()  # TaskError (a ValueError) is reported by pydantic under this section
        return self

    def to_task(self) -> Task:
        return Task(
            self.template,
            dict(self.label_words),
            name=self.name,
            label_word_prefix=self.label_word_prefix,
        )


class DataSource(_Section):
    """One split: a JSONL/CSV file, or a Hugging Face dataset (needs ``datasets``)."""

    path: Path | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str | None = None
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of path (a JSONL/CSV file) or hf_dataset")
        if self.path is not None and self.path.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise ValueError("path must be a .jsonl or .csv file")
        if self.hf_dataset is not None and self.split is None:
            raise ValueError("hf_dataset needs a split (e.g. split = 'train')")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        cfg = f"/{self.hf_config}" if self.hf_config else ""
        return f"hf:{self.hf_dataset}{cfg}[{self.split}]"


class DataSection(_Section):
    train: DataSource
    test: DataSource
    text_field: str = "text"
    label_field: str = "label"
    text_b_field: str | None = None
    id_field: str | None = None


class DecoderSection(_Section):
    """DecT settings (docs/reference/dect_method.md §3); also used by the prototype baseline."""

    projection_dim: int = Field(default=128, ge=1)
    prompt_weight: float | None = Field(default=None, ge=0)
    n_steps: int = Field(default=30, ge=1)
    lr: float = Field(default=0.01, gt=0)
    normalize: bool = True
    calibration: Literal["auto", "none", "logits", "logprobs"] = "auto"
    # The paper initialises the decoder identically for every data seed (global seed 123).
    random_state: int = 123
    save_models: Literal["none", "first_seed", "all"] = "first_seed"
    # auto_dect only: the class mix expected at prediction time. "auto" (default): the label
    # counts of the whole data.train file (labels only, no query) when it has an example of every
    # class, else none; "train": the same, an error if a class is missing; a table
    # {class: weight}; or "none" (the balanced k-shot sets' own mix). docs/decoders.md says why.
    class_prior: Literal["auto", "none", "train"] | dict[str, float] = "auto"


class BudgetSection(_Section):
    max_queries: int | None = Field(default=None, ge=0)
    max_requests: int | None = Field(default=None, ge=0)
    max_input_tokens: int | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0)


class ExperimentConfig(_Section):
    """A whole experiment: provider, task, data, shots x seeds x methods, limits and folders."""

    name: str = "experiment"
    provider: ProviderSection
    task: TaskSection
    data: DataSection
    shots: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    methods: list[MethodName] = Field(default_factory=lambda: list(METHOD_NAMES), min_length=1)
    decoder: DecoderSection = DecoderSection()
    budget: BudgetSection = BudgetSection()
    icl: ICLSection = ICLSection()
    bbt: BBTSection = BBTSection()
    # the report prices predicting this many new examples with each trained method
    predict_n: int = Field(default=1000, ge=1)
    # a folder, or a postgresql:// URL: one budget and cache for a team (docs/storage.md)
    cache_dir: Path | str = DEFAULT_HOME / "cache"
    ledger_dir: Path | str = DEFAULT_HOME / "ledger"
    output_dir: Path = Path("runs")

    @field_validator("cache_dir", "ledger_dir", mode="before")
    @classmethod
    def _store(cls, v: Any) -> Any:
        if is_database_url(v):
            parse_database_url(v, "the URL")  # refuses a password in it
            return v
        return Path(v) if isinstance(v, str) else v

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("shot counts must be positive integers")
        if len(set(v)) != len(v):
            raise ValueError("shot counts must be distinct")
        return sorted(v)

    @field_validator("seeds", "methods")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError("values must be distinct")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names folders)")
        return v

    # -- paths ------------------------------------------------------------------------------------

    def resolved(self, base_dir: str | PathLike[str]) -> ExperimentConfig:
        """A copy with relative paths made absolute against ``base_dir`` (``~`` expanded)."""
        base = Path(base_dir)

        def fix(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        def fix_source(s: DataSource) -> DataSource:
            return s if s.path is None else s.model_copy(update={"path": fix(s.path)})

        data = self.data.model_copy(
            update={"train": fix_source(self.data.train), "test": fix_source(self.data.test)}
        )
        return self.model_copy(
            update={
                "data": data,
                "cache_dir": fix(self.cache_dir)
                if isinstance(self.cache_dir, Path)
                else self.cache_dir,
                "ledger_dir": fix(self.ledger_dir)
                if isinstance(self.ledger_dir, Path)
                else self.ledger_dir,
                "output_dir": fix(self.output_dir),
            }
        )

    def to_public_dict(self) -> dict[str, Any]:
        """JSON-ready settings. Holds no secret: credentials are only ever named, never stored."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None
    ) -> ExperimentConfig:
        """Validate a mapping (as read from a file); errors name ``source`` and the key path."""
        _refuse_inline_secrets(data, source, ())
        try:
            cfg = cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, source)) from None
        return cfg.resolved(base_dir if base_dir is not None else Path.cwd())


def load_config(
    path: str | PathLike[str], overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Read, validate and resolve an experiment config file (``.toml``, ``.yaml`` or ``.yml``).

    ``overrides`` is a nested mapping merged over the file before validation, e.g.
    ``{"provider": {"base_url": "http://127.0.0.1:9000"}}``.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    raw_text = read_text(p, "config file")
    suffix = p.suffix.lower()
    data: Any
    if suffix == ".toml":
        if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
            raise ConfigError(f"{p}: reading TOML on Python 3.10 needs tomli (pip install tomli)")
        try:
            data = tomllib.loads(raw_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            yaml: Any = importlib.import_module("yaml")  # optional: PyYAML
        except ImportError:
            raise ConfigError(
                f"{p}: YAML configs need PyYAML (pip install pyyaml), or write the config as TOML"
            ) from None
        try:
            data = yaml.safe_load(raw_text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    else:
        raise ConfigError(f"{p}: unknown config format {suffix!r}; use .toml, .yaml or .yml")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: the config must be a table of settings at the top level")
    if overrides:
        data = merge(data, overrides)
    return ExperimentConfig.from_dict(data, source=str(p), base_dir=p.resolve().parent)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, table by table (values of ``over`` win)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _refuse_inline_secrets(data: Any, source: str, loc: tuple[str, ...]) -> None:
    """Refuse a provider key named like a credential: it would hold the key inline."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            here = (*loc, str(key))
            if loc and loc[0] == "provider" and is_credential_name(str(key)):
                raise ConfigError(
                    f"{source}: {'.'.join(here)}: inline credentials are refused; put the key in "
                    "an environment variable and give its name as provider.api_key_env"
                )
            _refuse_inline_secrets(value, source, here)


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = str(err["msg"])
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)
