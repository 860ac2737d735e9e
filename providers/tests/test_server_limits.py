"""Auth, limits and errors, each hit against the real server process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from dect_maas_server.cli import main
from dect_maas_server.engine import _keep_window
from dect_maas_server.testing import run_server
from server_reference import API_KEY, Reference


def _error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"type", "message"}
    assert err["type"]
    return str(err["message"])


# -- auth ---------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(masked_server: tuple[str, list[str]]) -> None:
    url, log = masked_server
    body = {"inputs": ["It was <mask>."], "label_token_ids": [1]}
    with httpx.Client(base_url=url) as client:
        msg = _error(client.post("/v1/features", json=body), 401)
        assert API_KEY not in msg
        for header in (f"Bearer {API_KEY}x", f"Basic {API_KEY}", API_KEY, "Bearer", "Bearer  x"):
            resp = client.post("/v1/features", json=body, headers={"Authorization": header})
            _error(resp, 401)
            assert API_KEY not in resp.text
        _error(client.get("/v1/models"), 401)
        _error(client.get("/metrics"), 401)
        assert client.get("/health").status_code == 200  # probes need no key
        ok = client.post("/v1/features", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200
        assert API_KEY not in ok.text
    assert not any(API_KEY in line for line in log)


def test_refuses_public_host_without_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DECT_MAAS_SERVER_API_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["--host", "0.0.0.0", "--model", "/nonexistent"])
    assert info.value.code == 2
    assert "--allow-public-without-key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-batch-size", "0"],
        ["--max-wait-ms", "-1"],
        ["--port", "70000"],
        ["--max-queue", "8", "--max-inputs-per-request", "9"],
    ],
)
def test_bad_flags_are_refused(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--model", "/nonexistent", *flags])
    assert info.value.code == 2


# -- body, inputs and tokens --------------------------------------------------------------


def test_body_too_large_is_413(masked: httpx.Client) -> None:
    big = {"inputs": ["It was <mask>. " + "good " * 2000], "label_token_ids": [1]}
    assert "8192 bytes" in _error(masked.post("/v1/features", json=big), 413)
    # A body sent chunked, without Content-Length, is cut off too.
    payload = json.dumps(big).encode()

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    resp = masked.post(
        "/v1/features", content=chunks(), headers={"Content-Type": "application/json"}
    )
    _error(resp, 413)


def test_too_many_inputs_is_413(masked: httpx.Client) -> None:
    body = {"inputs": ["<mask>"] * 17, "label_token_ids": [1]}
    assert "limit is 16" in _error(masked.post("/v1/features", json=body), 413)
    body["inputs"] = ["<mask>"] * 16
    assert masked.post("/v1/features", json=body).status_code == 200


def test_mask_count_422_names_the_input(masked: httpx.Client) -> None:
    for bad in ("no mask here", "two <mask> <mask>"):
        body = {"inputs": ["It was <mask>.", bad], "label_token_ids": [1]}
        msg = _error(masked.post("/v1/features", json=body), 422)
        assert "input 1 " in msg
        assert "exactly one" in msg


def test_malformed_bodies_are_json_errors(masked: httpx.Client) -> None:
    assert "inputs" in _error(masked.post("/v1/features", json={"inputs": "x"}), 422)
    _error(masked.post("/v1/features", json={"inputs": []}), 422)
    _error(
        masked.post(
            "/v1/features", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        422,
    )
    body = {"inputs": ["<mask>"], "label_token_ids": [10**6]}
    assert "outside the vocabulary" in _error(masked.post("/v1/features", json=body), 422)
    body = {"inputs": ["<mask>"], "encoding_format": "hex"}
    _error(masked.post("/v1/features", json=body), 422)
    _error(masked.get("/v1/nothing-here"), 404)
    _error(masked.get("/v1/features"), 405)


def test_masked_truncation_keeps_the_mask(masked: httpx.Client, ref_masked: Reference) -> None:
    text = "The movie " + "was really very good and " * 8 + "in summary it was <mask> ."
    body = {"inputs": [text], "label_token_ids": [5, 9]}
    resp = masked.post("/v1/features", json=body)
    assert resp.status_code == 200, resp.text
    item = resp.json()["data"][0]
    assert item["truncated"] is True
    assert item["n_tokens"] == 24
    # The reference runs the ids the documented policy keeps: the start and the mask's window.
    tok = ref_masked.tokenizer
    raw = tok(text, add_special_tokens=False)["input_ids"]
    keep = _keep_window(len(raw), 22, raw.index(tok.mask_token_id))
    ids = [tok.cls_token_id, *(raw[i] for i in keep), tok.sep_token_id]
    want = ref_masked.score(ids)
    assert item["token_logits"] == pytest.approx(want["logits"][[5, 9]].tolist(), abs=1e-4)
    assert tok.mask_token_id in ids


def test_causal_truncation_keeps_the_end(causal: httpx.Client, ref_causal: Reference) -> None:
    text = "The movie " + "was really very good and " * 8 + "in summary it was"
    resp = causal.post("/v1/completions", json={"prompt": text, "logprobs": 1})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    full = ref_causal.ids(text)
    assert choice["truncated"] is True
    assert len(choice["prompt_token_ids"]) == 24
    assert choice["prompt_token_ids"][-6:] == full[-6:]
    assert choice["prompt_token_ids"][:6] == full[:6]
    item = causal.post("/v1/features", json={"inputs": [text], "label_token_ids": [3]}).json()
    assert item["data"][0]["truncated"] is True
    assert item["data"][0]["n_tokens"] == 24


@pytest.mark.parametrize(
    ("length", "budget", "score"),
    [(10, 10, 3), (30, 10, 29), (30, 10, 0), (30, 10, 15), (30, 1, 15), (30, 2, 1), (5, 3, 4)],
)
def test_keep_window_keeps_score_and_budget(length: int, budget: int, score: int) -> None:
    keep = _keep_window(length, budget, score)
    assert score in keep
    assert len(keep) == min(length, budget)
    assert keep == sorted(set(keep))
    if budget >= 4 and score >= budget // 2:
        assert keep[: budget // 2] == list(range(budget // 2))  # the start survives


# -- endpoint-specific refusals -------------------------------------------------------------


def test_completions_refusals(causal: httpx.Client, masked: httpx.Client) -> None:
    assert "causal" in _error(masked.post("/v1/completions", json={"prompt": "x"}), 400)
    assert "0 or 1" in _error(
        causal.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}), 400
    )
    assert "between 0 and 5" in _error(
        causal.post("/v1/completions", json={"prompt": "x", "logprobs": 6}), 400
    )
    resp = causal.post("/v1/completions", json={"prompt": "x", "logprob_token_ids": [1]})
    assert "requires logprobs" in _error(resp, 400)
    resp = causal.post(
        "/v1/completions",
        json={
            "prompt": "x",
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "logprob_token_ids": [1],
        },
    )
    _error(resp, 400)
    _error(causal.post("/v1/completions", json={"prompt": "x", "stream": True}), 400)
    _error(causal.post("/v1/completions", json={"prompt": [10**6]}), 422)


def test_fill_mask_refusals(causal: httpx.Client, masked: httpx.Client) -> None:
    assert "masked LM" in _error(causal.post("/fill-mask", json={"inputs": "x <mask>"}), 400)
    body = {"inputs": "It was <mask>.", "parameters": {"top_k": 0}}
    _error(masked.post("/fill-mask", json=body), 400)
    _error(masked.post("/fill-mask", json={"inputs": "no mask"}), 422)


def test_tokenize(masked: httpx.Client, causal: httpx.Client, ref_causal: Reference) -> None:
    one = causal.post("/v1/tokenize", json={"text": " great"}).json()
    bare = causal.post("/v1/tokenize", json={"text": "great"}).json()
    assert one["ids"] == ref_causal.tokenizer(" great", add_special_tokens=False)["input_ids"]
    assert one["ids"] != bare["ids"]  # the leading space matters
    assert one["pieces"] == [" great"]
    assert one["data"] == [{"ids": one["ids"], "pieces": one["pieces"], "tokens": one["tokens"]}]
    many = causal.post("/v1/tokenize", json={"texts": [" great", "great"]}).json()
    assert [d["ids"] for d in many["data"]] == [one["ids"], bare["ids"]]
    assert "ids" not in many
    plain = masked.post("/v1/tokenize", json={"text": "good"}).json()["ids"]
    special = masked.post("/v1/tokenize", json={"text": "good", "add_special_tokens": True}).json()
    assert special["ids"] == [0, *plain, 2]  # <s> good </s>
    _error(causal.post("/v1/tokenize", json={}), 422)
    _error(causal.post("/v1/tokenize", json={"text": "a", "texts": ["b"]}), 422)


def test_models_and_metrics(masked: httpx.Client, causal: httpx.Client) -> None:
    models = masked.get("/v1/models").json()
    (entry,) = models["data"]
    assert entry["kind"] == "masked"
    assert entry["mask_token"] == "<mask>"
    assert entry["max_input_tokens"] == 24
    assert entry["fingerprint"] != causal.get("/v1/models").json()["data"][0]["fingerprint"]
    before = masked.get("/metrics").json()
    masked.post("/v1/features", json={"inputs": ["<mask>"] * 3, "label_token_ids": [1]})
    after = masked.get("/metrics").json()
    assert after["queries_total"] == before["queries_total"] + 3
    assert after["requests_total"] >= before["requests_total"] + 2
    assert after["queue_depth"] == 0
    assert sum(after["batch_size_histogram"].values()) == after["batches_total"]
    assert after["batch_size_mean"] == pytest.approx(
        after["queries_total"] / after["batches_total"]
    )


# -- a full queue, and the one-line logs -----------------------------------------------------


def test_full_queue_is_429_with_retry_after(tiny_causal: Path) -> None:
    log: list[str] = []
    # The worker waits up to 1.5 s for a batch of 8; the queue holds 4: the second request
    # arrives while the first 4 queries wait, so it cannot be queued.
    with run_server(
        tiny_causal,
        log=log,
        max_queue=4,
        max_batch_size=8,
        max_wait_ms=1500,
        max_inputs_per_request=4,
    ) as url:

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(
                    client.post("/v1/features", json={"inputs": ["a", "b", "c", "d"]})
                )
                await asyncio.sleep(0.5)
                second = await client.post("/v1/features", json={"inputs": ["e"]})
                return await first, second

        first, second = asyncio.run(scenario())
        assert first.status_code == 200
        _error(second, 429)
        assert int(second.headers["Retry-After"]) >= 1
        with httpx.Client(base_url=url) as client:
            assert client.get("/metrics").json()["rejected_total"] == 1
            assert client.post("/v1/features", json={"inputs": ["e"]}).status_code == 200
    text = "".join(log)
    assert text.count("model loaded:") == 1
    assert text.count("listening on http://127.0.0.1:") == 1
    assert text.count("shutdown after") == 1
