"""One k-shot set as the input-side methods (ICL, BBT) receive it: data, settings and a client.

ICL and BBT query the provider themselves, each k-shot set with its own prompts, so the runner
hands each of them this one object rather than the same ten keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dect_maas._task import Task
from dect_maas.client.client import Client
from dect_maas.client.plan import SCALE_MARGIN, Estimate

from .config_file import ExperimentConfig

__all__ = ["ClientFactory", "ShotSet", "Split", "scaled_tokens"]

#: Builds the experiment's client (provider, cache, budget, ledger) for a run id.
ClientFactory = Callable[[ExperimentConfig, str], Client]


class Split(Protocol):
    @property
    def texts(self) -> list[str]: ...
    @property
    def texts_b(self) -> list[str] | None: ...
    @property
    def labels(self) -> list[str]: ...


@dataclass(frozen=True)
class ShotSet:
    """The k-shot set ``train_indices`` (pool rows of ``train``) drawn with ``seed``."""

    config: ExperimentConfig
    run_id: str
    client_factory: ClientFactory
    task: Task
    train: Split
    test: Split
    train_indices: Sequence[int]
    shots: int
    seed: int
    progress: bool = False

    def client(self) -> Client:
        """A new client on the experiment's cache, budget and ledger (the caller closes it)."""
        return self.client_factory(self.config, self.run_id)

    def n_test(self, limit: int | None) -> int:
        """How many test rows a method evaluating on the first ``limit`` rows scores."""
        return len(self.test.texts) if limit is None else min(limit, len(self.test.texts))


def scaled_tokens(est: Estimate, ratio: float | None, unscaled: int = 0) -> tuple[int, float]:
    """``est``'s input tokens and dollars, its byte bound scaled by ``ratio`` where ``est`` had
    no cached answer of its own to scale from (ICL's and BBT's prompts are new on every run).

    ``ratio``: provider tokens over the byte bound in the run's other cached answers (the same
    texts, the same tokenizer); ``unscaled``: tokens counted exactly (soft-prompt rows). Dollars
    follow the tokens in proportion.
    """
    if est.token_ratio is not None or ratio is None or est.input_tokens <= unscaled:
        return est.input_tokens, est.cost_usd
    text = est.input_tokens - unscaled
    tokens = unscaled + min(text, math.ceil(text * ratio * (1 + SCALE_MARGIN)))
    return tokens, est.cost_usd * tokens / est.input_tokens
