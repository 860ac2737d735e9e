"""The HTTP stack under the client, on a real loopback server: what a request costs besides the
network."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from faultserver import FaultServer

from dect_maas import CacheConfig, Client, Task
from dect_maas.adapters import LocalAdapter

TASK = Task("{text} Overall, it was {mask}", {"neg": "bad", "pos": "great"})


class _ImportSpy(importlib.abc.MetaPathFinder):
    """Notes every module Python goes looking for, and finds none itself."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        self.names.append(fullname)
        return None


def test_requests_import_nothing(tmp_path: Path) -> None:
    """httpcore 1.0.x imports sniffio on every lock operation. Without sniffio installed, each
    of those is a failed import, which Python never caches: a search of sys.path, about 0.8 ms
    of CPU per request on a 2-core machine. dect-maas depends on sniffio for that reason; any
    other import left in the request path would show here too."""
    spy = _ImportSpy()
    with (
        FaultServer(rate=0.0).run() as url,
        Client(
            LocalAdapter(url, max_inputs_per_request=1),
            cache=CacheConfig(tmp_path / "cache"),
            ledger=tmp_path / "ledger",
            max_concurrency=2,
        ) as client,
    ):
        client.features(TASK, ["warm up"])  # first use imports what it needs
        sys.meta_path.insert(0, spy)
        try:
            feats = client.features(TASK, [f"text {i}" for i in range(12)])
        finally:
            sys.meta_path.remove(spy)
        assert client.ledger.summary().requests == 12 + 2  # + the warm-up and the content-free
    assert feats.hidden is not None
    assert feats.hidden.shape[0] == 12
    assert spy.names == []
