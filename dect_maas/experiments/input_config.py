"""Settings of the input-side methods (``icl``, ``calibrated_icl``, ``bbt``) in an experiment.

Kept apart from ``_config_file`` so that the methods' own modules can read them without importing
the whole config machinery; ``ExperimentConfig`` holds one of each as ``icl`` and ``bbt``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BBTSection", "ICLSection"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ICLSection(_Section):
    """In-context learning: the k-shot set as demonstrations before every test input.

    ``max_prompt_tokens``: when set, demonstrations are dropped (the ones farthest from the test
    input first) until the prompt's worst-case token count (one token per UTF-8 byte, the bound
    the budget reserves with) fits; None leaves the prompt whole and the provider's own
    truncation applies. ``separator`` goes between demonstrations and before the test prompt.
    ``test_limit`` evaluates ICL on the first N test examples only (its prompts are long).
    """

    max_prompt_tokens: int | None = Field(default=None, ge=1)
    separator: str = "\n\n"
    test_limit: int | None = Field(default=None, ge=1)


class BBTSection(_Section):
    """Black-Box Tuning (Sun et al., ICML 2022); defaults are the BBT paper's.

    ``budget`` counts API calls, one call being one candidate prompt evaluated on all the
    training shots (one request). ``concurrency``: how many of a generation's candidates are in
    flight at once (None: the whole population), so that a server that batches them
    (dect-maas-server does) answers them in one pass; the client's ``max_concurrency`` still
    caps the connections, and every call is counted alike. ``test_limit`` evaluates on the
    first N test examples only (BBT's test queries carry the soft prompt, so they are paid again
    for every k-shot set).
    """

    intrinsic_dim: int = Field(default=500, ge=1)
    prompt_length: int = Field(default=50, ge=1)
    popsize: int = Field(default=20, ge=2)
    budget: int = Field(default=8000, ge=1)
    sigma: float = Field(default=1.0, gt=0)
    loss: Literal["ce", "hinge"] = "ce"
    random_projection: Literal["normal", "uniform"] = "normal"
    seed: int = 42
    test_limit: int | None = Field(default=None, ge=1)
    curve_every: int = Field(default=0, ge=0)
    concurrency: int | None = Field(default=None, ge=1)
