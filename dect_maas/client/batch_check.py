"""The one-time check that an embeddings endpoint answers a batch as it answers each text alone.

Some servers do not: llama-cpp-python 0.3.36 returns correct vectors only for the first input of
a multi-input ``/v1/embeddings`` request, and nothing in its answer shows it. Before the first
batched vectors request to an endpoint the client sends two short texts together and each alone
(three small paid requests, in the ledger like any other) and compares; the verdict is cached per
endpoint, model and pooling, so the check is paid once. Pure helpers here; the client sends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MIN_COSINE", "PROBES", "agreement", "probe_key", "verdict_key"]

#: Two texts of different lengths: a server that reads later inputs at the wrong offset (as
#: llama-cpp-python does) shows it on the second.
PROBES = ("The film was a quiet, patient study of grief and of the people left behind.", "Awful.")
#: Batched and single vectors must point the same way; numeric noise of batching (padding, other
#: kernels) stays far above this, a mis-batched vector (cosine near 0) far below.
MIN_COSINE = 0.99


def verdict_key(endpoint: str, model: str, hidden_kind: str) -> str:
    raw = json.dumps(["dect-maas/batch-check/1", endpoint, model, hidden_kind])
    return hashlib.sha256(raw.encode()).hexdigest()


def probe_key(request_json: str, position: int) -> str:
    raw = json.dumps(["dect-maas/batch-check-probe/1", request_json, position])
    return hashlib.sha256(raw.encode()).hexdigest()


def agreement(batched: Sequence[Any], alone: Sequence[Any]) -> float:
    """The smallest cosine similarity between each batched vector and the same text's alone."""
    worst = 1.0
    for a, b in zip(batched, alone, strict=True):
        x = np.asarray(a, dtype=np.float64).ravel()
        y = np.asarray(b, dtype=np.float64).ravel()
        if x.shape != y.shape:
            return -1.0
        denom = float(np.linalg.norm(x) * np.linalg.norm(y))
        cos = float(x @ y) / denom if denom > 0 else (1.0 if np.array_equal(x, y) else -1.0)
        worst = min(worst, cos)
    return worst
