"""One k-shot set as the input-side methods (ICL, BBT) receive it: data, settings and a client.

ICL and BBT query the provider themselves, each k-shot set with its own prompts, so the runner
hands each of them this one object rather than the same ten keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dect_maas._task import Task
from dect_maas.client.client import Client

from .config_file import ExperimentConfig

__all__ = ["ClientFactory", "ShotSet", "Split"]

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
