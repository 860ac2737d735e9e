"""One contract over every adapter (sklearn's parametrize_with_checks, in small).

Each case gives an adapter, a task it serves, one it cannot, and a response body per role in the
real API's shape. Every adapter must: declare capabilities; build deterministic, JSON-serialisable
requests that respect its batch limit; give stable cache keys that change with what changes the
answer; parse its fixtures; raise MalformedResponse (never KeyError/TypeError) on damaged bodies;
and refuse a task it cannot serve before anything is sent.

Reaches inside for the ``Role`` type only: the contract is stated per endpoint role.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import pytest

from dect_maas import Client, MalformedResponse, Task, UnsupportedCapability
from dect_maas.adapters import (
    Adapter,
    Capabilities,
    HFInferenceAdapter,
    Label,
    LocalAdapter,
    OpenAIChatAdapter,
    OpenAICompatibleAdapter,
    Prompt,
    RequestSpec,
    TEIAdapter,
)
from dect_maas.adapters._base import Role

CAUSAL = Task("{text} Overall, it was {mask}", {"neg": ["terrible", "bad"], "pos": "great"})
MASKED = Task("{text} It was {mask}.", {"neg": ["terrible", "bad"], "pos": "great"})
LABELS = (Label(" terrible", (13321,)), Label(" bad", (4527,)), Label(" great", (1109,)))
TEXTS = ["A dull, lifeless film.", "I loved every minute.", "Fine.", "Meh", "Wow!"]


def _b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def local_body(spec: RequestSpec) -> Any:
    n = len(spec.indices)
    return {
        "model": "tiny",
        "fingerprint": "sha256:abc",
        "data": [
            {
                "token_logits": [1.0 + i, 2.0, 3.0],
                "token_logprobs": [-3.0 - i, -2.0, -1.0],
                "hidden": _b64([0.5 * i, 1.0, -1.0, 2.0]),
                "n_tokens": 7,
                "truncated": False,
            }
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 7 * n},
    }


def completions_body(spec: RequestSpec) -> Any:
    """llama.cpp / OpenAI legacy completions with top-k logprobs (as recorded from llama.cpp)."""
    top = {" a": -0.6, " great": -4.15, " bad": -4.9, " fun": -5.6}
    return {
        "object": "text_completion",
        "model": "m",
        "choices": [
            {
                "text": " a",
                "index": i,
                "logprobs": {
                    "text_offset": [51],
                    "token_logprobs": [-0.6],
                    "tokens": [" a"],
                    "top_logprobs": [top],
                },
                "finish_reason": "length",
            }
            for i in range(len(spec.indices))
        ],
        "usage": {"prompt_tokens": 11 * len(spec.indices), "completion_tokens": 1},
    }


def vllm_exact_body(spec: RequestSpec) -> Any:
    """vLLM with logprob_token_ids + return_tokens_as_token_ids: keys are 'token_id:<id>'."""
    body = completions_body(spec)
    for c in body["choices"]:
        c["logprobs"]["top_logprobs"] = [
            {"token_id:13321": -7.5, "token_id:4527": -4.9, "token_id:1109": -4.15}
        ]
    return body


def chat_body(spec: RequestSpec) -> Any:
    """OpenAI chat with top_logprobs: two forms of "great", none of "terrible", a -9999 sentinel."""
    top = [("The", -0.5), ("Great", -1.0), ("great", -2.0), (" bad", -3.0), ("x", -9999.0)]
    entries = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]
    return {
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The"},
                "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31},
    }


def vllm_chat_exact_body(spec: RequestSpec) -> Any:
    body = chat_body(spec)
    content = body["choices"][0]["logprobs"]["content"][0]
    content["top_logprobs"] = [
        {"token": f"token_id:{i}", "logprob": v, "bytes": None}
        for i, v in ((13321, -7.5), (4527, -4.9), (1109, -4.15))
    ]
    return body


def embeddings_body(spec: RequestSpec) -> Any:
    n = len(spec.indices)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.1 * i, 0.2, 0.3]} for i in range(n)
        ],
        "model": "e",
        "usage": {"prompt_tokens": 5 * n, "total_tokens": 5 * n},
    }


def fill_mask_body(spec: RequestSpec) -> Any:
    return [
        {"score": 0.25, "token": 1109, "token_str": " great", "sequence": "x great."},
        {"score": 0.05, "token": 4527, "token_str": " bad", "sequence": "x bad."},
        {"score": 0.01, "token": 13321, "token_str": " terrible", "sequence": "x terrible."},
    ]


def feature_extraction_body(spec: RequestSpec) -> Any:
    return [[[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]] for _ in spec.indices]  # per-token: pooled


def tei_body(spec: RequestSpec) -> Any:
    return [[0.1 * i, 0.2, 0.3, 0.4] for i in range(len(spec.indices))]


@dataclass(frozen=True)
class Case:
    name: str
    adapter: Any
    task: Task
    bad_task: Task | None
    bodies: dict[str, Callable[[RequestSpec], Any]]
    expect_scores: list[float] | None = None  # first example, flat label order
    expect_censored: list[bool] | None = None


CASES = [
    Case(
        "local-masked",
        LocalAdapter("http://srv", kind="masked", mask_token="<mask>", revision="r1"),
        MASKED,
        Task("{text} It was great.", {"a": "x", "b": "y"}),
        {"features": local_body},
        [1.0, 2.0, 3.0],
    ),
    Case(
        "local-causal",
        LocalAdapter("http://srv", kind="causal", revision="r1", max_inputs_per_request=2),
        CAUSAL,
        Task("{mask} is what {text} was", {"a": "x", "b": "y"}),
        {"features": local_body},
        [-3.0, -2.0, -1.0],
    ),
    Case(
        "openai-topk+embeddings",
        OpenAICompatibleAdapter(
            "http://llama", "smol", embeddings_base_url="http://embed", max_prompts_per_request=1
        ),
        CAUSAL,
        Task("{mask} is what {text} was", {"a": "x", "b": "y"}),
        {"scores": completions_body, "vectors": embeddings_body},
        [-5.6, -4.9, -4.15],
        [True, False, False],
    ),
    Case(
        "openai-vllm-exact",
        OpenAICompatibleAdapter(
            "http://vllm", "m", exact_token_ids=True, tokenize_api="vllm", max_prompts_per_request=3
        ),
        CAUSAL,
        Task("{mask} is what {text} was", {"a": "x", "b": "y"}),
        {"scores": vllm_exact_body},
        [-7.5, -4.9, -4.15],
        [False, False, False],
    ),
    Case(
        "openai-chat-topk+embeddings",
        OpenAIChatAdapter(
            "https://api.example.com/v1",
            "gpt-4o-mini",
            system="Answer with one word.",
            embeddings_model="text-embedding-3-small",
        ),
        CAUSAL,
        Task("{mask} is what {text} was", {"a": "x", "b": "y"}),
        {"scores": chat_body, "vectors": embeddings_body},
        [-3.0, -3.0, math.log(math.exp(-1.0) + math.exp(-2.0))],
        [True, False, False],
    ),
    Case(
        "openai-chat-vllm-exact",
        OpenAIChatAdapter("http://vllm:8000", "m", exact_token_ids=True, tokenize_api="vllm"),
        CAUSAL,
        Task("{mask} is what {text} was", {"a": "x", "b": "y"}),
        {"scores": vllm_chat_exact_body},
        [-7.5, -4.9, -4.15],
        [False, False, False],
    ),
    Case(
        "hf-inference",
        HFInferenceAdapter("FacebookAI/roberta-large", embeddings_model="BAAI/bge-small-en-v1.5"),
        MASKED,
        CAUSAL.__class__("{text} It was great.", {"a": "x", "b": "y"}),
        {"scores": fill_mask_body, "vectors": feature_extraction_body},
        [math.log(0.01), math.log(0.05), math.log(0.25)],
    ),
    Case(
        "tei",
        TEIAdapter("http://tei", max_inputs_per_request=2),
        CAUSAL,
        None,
        {"vectors": tei_body},
    ),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


def prompts(case: Case, role: Role) -> list[Prompt]:
    return [Prompt(i, case.adapter.prompt(role, case.task, t, None)) for i, t in enumerate(TEXTS)]


def specs(case: Case, role: Role) -> list[RequestSpec]:
    labels = LABELS if role != "vectors" else ()
    return case.adapter.build_requests(role, prompts(case, role), labels)  # type: ignore[no-any-return]


def test_is_an_adapter_and_declares_capabilities(case: Case) -> None:
    assert isinstance(case.adapter, Adapter)
    roles = case.adapter.roles(case.task)
    assert set(roles) == set(case.bodies)
    for role in roles:
        caps = case.adapter.capabilities(role)
        assert isinstance(caps, Capabilities)
        assert caps.max_inputs_per_request >= 1
        assert caps.scores in ("exact", "top-k", "none")
        if role == "vectors":
            assert caps.vectors != "none"
            assert caps.scores == "none"
        else:
            assert caps.scores != "none"
            assert caps.score_kind in ("logits", "logprobs")
        if caps.scores == "top-k":
            assert caps.top_k
            assert caps.top_k > 0
        assert case.adapter.prices.cost(requests=2, input_tokens=10**6) >= 0


def test_requests_are_deterministic_serialisable_and_batched(case: Case) -> None:
    for role in case.adapter.roles(case.task):
        first, second = specs(case, role), specs(case, role)
        assert first == second
        assert [s.to_json() for s in first] == [s.to_json() for s in second]
        limit = case.adapter.capabilities(role).max_inputs_per_request
        assert all(1 <= len(s.indices) <= limit for s in first)
        assert [i for s in first for i in s.indices] == list(range(len(TEXTS)))
        for s in first:
            json.loads(s.to_json())
            assert s.method in ("GET", "POST")
            assert s.url.startswith("http")
            assert s.input_tokens >= sum(len(TEXTS[i]) for i in s.indices)
            assert "authorization" not in json.dumps(s.body).lower()


def _keys(case: Case, adapter: Any, labels: tuple[Label, ...] = LABELS) -> list[str]:
    client = Client(adapter, cache=None, transport=httpx.MockTransport(_no_io))
    try:
        pairs = [(t, None) for t in TEXTS]
        out = []
        for role in adapter.roles(case.task):
            out += client._plan(
                adapter, role, case.task, pairs, labels if role != "vectors" else ()
            ).keys
        return out
    finally:
        client.close()


def _no_io(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be sent here, got {request.method} {request.url}")


def test_cache_keys_are_stable_and_cover_what_changes_the_answer(case: Case) -> None:
    keys = _keys(case, case.adapter)
    assert keys == _keys(case, replace(case.adapter))  # another instance, same settings
    assert len(set(keys)) == len(keys)  # one key per example and role (+ content-free)
    assert all(len(k) == 64 for k in keys)
    moved = replace(case.adapter, revision="another-revision")
    assert set(_keys(case, moved)).isdisjoint(keys)
    if any(r != "vectors" for r in case.adapter.roles(case.task)):
        other = (Label(" terrible", (1,)), Label(" bad", (2,)), Label(" great", (3,)))
        changed = _keys(case, case.adapter, other)
        if case.name != "hf-inference":  # fill-mask takes label strings; ids play no part
            n_vec = len(TEXTS) if "vectors" in case.bodies else 0
            score_keys = keys[: len(keys) - n_vec]
            assert set(changed[: len(score_keys)]).isdisjoint(score_keys)


def test_fixtures_parse(case: Case) -> None:
    for role in case.adapter.roles(case.task):
        for spec in specs(case, role):
            records = case.adapter.parse_response(spec, 200, {}, case.bodies[role](spec))
            assert len(records) == len(spec.indices)
            for r in records:
                if role != "vectors":
                    assert len(r["s"]) == len(LABELS)
                if role != "scores":
                    assert np.asarray(r["h"]).ndim == 1
                    assert np.asarray(r["h"]).size > 0
        if role != "vectors" and case.expect_scores is not None:
            first = case.adapter.parse_response(
                specs(case, role)[0], 200, {}, case.bodies[role](specs(case, role)[0])
            )[0]
            np.testing.assert_allclose(first["s"], case.expect_scores, rtol=1e-6)
            if case.expect_censored is not None:
                assert first["c"] == case.expect_censored


def _damaged(body: Any) -> Iterator[Any]:
    """Every body with one part deleted or replaced by a wrong type, plus junk bodies."""
    yield from (None, "oops", 3, [], {}, {"data": None}, {"choices": "x"}, [None], [[]])

    def paths(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield (*path, k)
                yield from paths(v, (*path, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:2]):
                yield (*path, i)
                yield from paths(v, (*path, i))

    for path in paths(body):
        for replacement in (None, "x", {"z": 1}, [], float("nan"), True, -1):
            damaged = copy.deepcopy(body)
            target = damaged
            for p in path[:-1]:
                target = target[p]
            target[path[-1]] = replacement
            yield damaged
        damaged = copy.deepcopy(body)
        target = damaged
        for p in path[:-1]:
            target = target[p]
        if isinstance(target, dict):
            del target[path[-1]]
            yield damaged


def test_damaged_bodies_raise_malformed_response_only(case: Case) -> None:
    for role in case.adapter.roles(case.task):
        spec = specs(case, role)[0]
        raised = 0
        for body in _damaged(case.bodies[role](spec)):
            try:
                case.adapter.parse_response(spec, 200, {}, body)
            except MalformedResponse:
                raised += 1
        assert raised >= 9  # at least every junk body


def test_unsupported_task_is_refused_before_any_request(case: Case) -> None:
    if case.bad_task is None:
        pytest.skip("this adapter serves every task (vectors only)")
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    with pytest.raises(UnsupportedCapability) as info:
        case.adapter.roles(case.bad_task)
    assert case.adapter.name in str(info.value)
    assert "Nothing was sent" in str(info.value)
    with (
        Client(case.adapter, cache=None, transport=httpx.MockTransport(record)) as client,
        pytest.raises(UnsupportedCapability),
    ):
        client.features(case.bad_task, TEXTS)
    assert sent == []


def test_exact_scores_need_token_ids_before_anything_is_sent() -> None:
    adapter = OpenAICompatibleAdapter("http://x", "m", exact_token_ids=True, tokenize_api="none")
    with pytest.raises(UnsupportedCapability, match="label token ids"):
        adapter.roles(CAUSAL)
    ok = replace(adapter, label_token_ids={" terrible": [1], " bad": [2], " great": [3]})
    assert ok.roles(CAUSAL) == ("scores",)


def test_a_spec_never_describes_more_than_it_carries() -> None:
    spec = specs(CASES[0], "features")[0]
    text = spec.describe()
    assert text.startswith("POST http://srv/v1/features")  # the full URL that was sent
    assert "content-free" not in text
    many = replace(spec, indices=(*range(20), -1))
    assert "and 13 more" in many.describe()
