"""llama.cpp's chat route, from a recording of the real server (llama-cpp-python 0.3.36,
SmolLM2-135M-Instruct Q4_1): the chat adapter sends the body it was recorded with and reads the
label words' spellings from its top-20 candidates, combined by logsumexp (or max)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dect_maas import Task
from dect_maas.adapters import OpenAIChatAdapter
from dect_maas.client.client import Client

RECORDING = json.loads(
    (Path(__file__).parent / "fixtures" / "llamacpp" / "chat_logprobs20.json").read_text()
)
TEXT = "A gorgeous, witty, heartfelt film."
TASK = Task(
    "Review: {text}\nIs this review negative or positive? Answer with one word. {mask}",
    {"negative": "negative", "positive": "positive"},
    label_word_prefix="",
)


def lse(*xs: float) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def features(tmp_path: Path, combine: str) -> tuple[Any, list[Any]]:
    sent: list[Any] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        rec = RECORDING["response"]
        return httpx.Response(rec["status"], json=rec["json"])  # the content-free prompt too

    adapter = OpenAIChatAdapter(
        "http://llama-scores.test/v1",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        top_logprobs=20,
        combine=combine,  # type: ignore[arg-type]
    )
    with Client(
        adapter, cache=None, ledger=tmp_path / combine, transport=httpx.MockTransport(answer)
    ) as client:
        return client.features(TASK, [TEXT]), sent


@pytest.mark.parametrize("combine", ["logsumexp", "max"])
def test_the_recorded_chat_answer_scores_both_classes(tmp_path: Path, combine: str) -> None:
    feats, sent = features(tmp_path, combine)
    mine = next(b for b in sent if TEXT in b["messages"][0]["content"])
    assert mine == RECORDING["request"]["json"]  # exactly the body the server answered
    assert feats.censored is None or not feats.censored.any()  # None: nothing censored
    fn = lse if combine == "logsumexp" else max
    want = [fn(-2.9024, -4.5678), fn(-2.7274, -2.8018)]  # negative/Negative, positive/Positive
    assert feats.scores is not None
    np.testing.assert_allclose(feats.scores[0], want, atol=2e-3)
