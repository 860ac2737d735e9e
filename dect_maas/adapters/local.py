"""The project's own server (``dect-maas-server``): exact label scores and the hidden state in one
query.

``POST /v1/features`` returns, per input, the raw logits and the log-softmax of the listed token ids
and the last-layer hidden state at the scoring position. Which score we keep depends on the model:

- masked LMs: the raw logits (``score_kind="logits"``), exactly the paper's setting (DecT §2.2);
- causal LMs: the log-probabilities (``score_kind="logprobs"``), the calibrated form every causal-LM
  API returns, so that features from this server and from an OpenAI-compatible one are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np

from dect_maas._task import Task

from ._base import (
    JSON,
    Capabilities,
    Label,
    Prices,
    Prompt,
    RequestSpec,
    Role,
    check_causal,
    check_urls,
    chunks,
    count_of,
    count_texts_requests,
    decode_vector,
    encode_vector,
    estimate_tokens,
    get,
    malformed,
    numbers,
    one_per_input,
    refuse,
    split_tokens,
)

__all__ = ["LocalAdapter"]


@dataclass(frozen=True)
class LocalAdapter:
    """Adapter for our local server.

    The client first asks the server (``GET /v1/models``, free) for the model's name, kind, mask
    token and fingerprint; set ``kind`` and ``mask_token`` to state them up front instead. The
    fingerprint becomes ``revision``, part of every cache key, so a changed model is never answered
    from the cache. ``label_token_ids`` (label string -> ids) skips the tokenize call.
    """

    base_url: str = "http://127.0.0.1:8000"
    model: str = "local"
    kind: Literal["masked", "causal"] | None = None
    mask_token: str | None = None
    max_inputs_per_request: int = 64
    encoding_format: Literal["base64", "float"] = "base64"
    label_token_ids: Mapping[str, Sequence[int]] | None = None
    revision: str | None = None
    prices: Prices = field(default_factory=Prices)
    # The server's caps on label ids per input and on inputs x ids per request (from
    # /v1/models): requests are cut to fit, so a large label set never meets a 413.
    max_label_token_ids: int | None = None
    max_scores_per_request: int | None = None
    # Soft prompts (BBT): what the server declared under /v1/models "soft_prompt" (None: not
    # served), and the prompt to send, base64 float32 (L, hidden) as the server takes it.
    soft_prompt: Mapping[str, JSON] | None = None
    prompt_embeds: str | None = field(default=None, repr=False)

    name: ClassVar[str] = "local"
    version: ClassVar[str] = "1"
    provider: ClassVar[str] = "local"

    def __post_init__(self) -> None:
        check_urls(self)

    @property
    def effective_kind(self) -> Literal["masked", "causal"]:
        """``kind``, or until the server said: masked when a mask token is given, else causal."""
        if self.kind is not None:
            return self.kind
        return "masked" if self.mask_token is not None else "causal"

    def capabilities(self, role: Role) -> Capabilities:
        return Capabilities(
            scores="exact",
            vectors="mask_hidden" if self.effective_kind == "masked" else "last_hidden",
            max_inputs_per_request=self.max_inputs_per_request,
            score_kind="logits" if self.effective_kind == "masked" else "logprobs",
            masked_lm=self.effective_kind == "masked",
        )

    def roles(self, task: Task) -> tuple[Role, ...]:
        if self.prompt_embeds is not None:
            if self.soft_prompt is None:
                raise refuse(
                    self.name,
                    "this server declares no soft-prompt input (prompt_embeds in /v1/models); "
                    "it serves soft prompts for causal LMs only",
                )
            check_causal(self.name, task)
            return ("scores",)  # the label scores only: no vectors are asked or stored
        if self.effective_kind == "masked":
            if self.mask_token is None:
                raise refuse(self.name, "a masked LM needs mask_token (e.g. '<mask>')")
            if not task.has_mask:
                raise refuse(self.name, f"template {task.template!r} has no {{mask}} position")
        else:
            check_causal(self.name, task)
        return ("features",)

    def endpoint(self, role: Role) -> tuple[str, str]:
        return self.base_url, "/v1/features"

    @property
    def soft_rows(self) -> int:
        """The soft prompt's rows (the server bills each as a token of every input); 0 without."""
        if self.prompt_embeds is None:
            return 0
        hidden = (self.soft_prompt or {}).get("hidden_size")
        size = len(self.prompt_embeds) * 3 // 4 - self.prompt_embeds[-2:].count("=")
        return size // (4 * hidden) if isinstance(hidden, int) and hidden > 0 else 0

    def prompt(self, role: Role, task: Task, text: str, text_b: str | None) -> str:
        return task.render(
            text, text_b, mask_token=self.mask_token if self.effective_kind == "masked" else None
        )

    def example_body(self, role: Role, prompt: str, labels: Sequence[Label]) -> dict[str, JSON]:
        return self._body([prompt], labels)

    def _body(self, inputs: list[str], labels: Sequence[Label]) -> dict[str, JSON]:
        body: dict[str, JSON] = {
            "model": self.model,
            "inputs": inputs,
            "label_token_ids": [lab.first for lab in labels],
            "return_hidden": self.prompt_embeds is None,
            "encoding_format": self.encoding_format,
        }
        if self.prompt_embeds is not None:
            body["prompt_embeds"] = self.prompt_embeds
        return body

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]:
        n_labels = len(labels)
        if self.max_label_token_ids is not None and n_labels > self.max_label_token_ids:
            raise refuse(
                self.name,
                f"{n_labels} label words to score per input; the server takes at most "
                f"{self.max_label_token_ids} (its --max-label-token-ids)",
            )
        per_request = self.max_inputs_per_request
        if self.max_scores_per_request is not None and n_labels:
            per_request = max(1, min(per_request, self.max_scores_per_request // n_labels))
        return [
            RequestSpec(
                role=role,
                method="POST",
                base_url=self.base_url,
                path="/v1/features",
                body=self._body([p.text for p in part], labels),
                indices=tuple(p.index for p in part),
                input_tokens=sum(estimate_tokens(p.text) + self.soft_rows for p in part),
                labels=tuple(labels),
            )
            for part in chunks(prompts, per_request)
        ]

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        data = one_per_input(spec, body, "data")
        fingerprint = body.get("fingerprint") if isinstance(body, dict) else None
        usage = body.get("usage")
        shares = split_tokens(
            usage.get("prompt_tokens") if isinstance(usage, dict) else None, len(data)
        )
        key = "token_logits" if self.effective_kind == "masked" else "token_logprobs"
        out = []
        for i, item in enumerate(data):
            scores = numbers(spec, get(spec, item, key), f"data[{i}].{key}")
            if len(scores) != len(spec.labels):
                raise malformed(
                    spec, f"data[{i}].{key} has {len(scores)} values, asked for {len(spec.labels)}"
                )
            raw = get(spec, item, "hidden")
            hidden: np.ndarray[Any, Any] | None
            if raw is None and self.prompt_embeds is not None:
                hidden = None  # scores only (a soft-prompt request asks for no vectors)
            elif isinstance(raw, list):
                hidden = encode_vector(numbers(spec, raw, f"data[{i}].hidden"))
            elif isinstance(raw, str):
                try:
                    hidden = decode_vector(raw)
                except ValueError:
                    raise malformed(spec, f"data[{i}].hidden is not valid base64") from None
            else:
                raise malformed(spec, f"data[{i}].hidden is neither a list nor base64")
            if hidden is not None and (hidden.size == 0 or not np.isfinite(hidden).all()):
                raise malformed(spec, f"data[{i}].hidden is empty or not finite")
            n_tok = item.get("n_tokens")
            n_tok = n_tok if isinstance(n_tok, int) and not isinstance(n_tok, bool) else shares[i]
            out.append(
                {
                    "s": scores,
                    "c": None,
                    "h": hidden,
                    "t": n_tok,
                    "fp": fingerprint if isinstance(fingerprint, str) else None,
                    "truncated": bool(item.get("truncated", False)),
                }
            )
        return out

    def tokenize_request(self, text: str) -> RequestSpec | None:
        if self.known_label_ids(text) is not None:
            return None
        return RequestSpec(
            role="features",
            method="POST",
            base_url=self.base_url,
            path="/v1/tokenize",
            body={"model": self.model, "text": text, "add_special_tokens": False},
        )

    def parse_tokenize(self, spec: RequestSpec, body: JSON) -> list[int]:
        return parse_token_ids(spec, body)

    def count_requests(self, role: Role, texts: Sequence[str]) -> list[RequestSpec]:
        return count_texts_requests(
            role, self.base_url, self.model, texts, self.max_inputs_per_request
        )

    def parse_count(self, spec: RequestSpec, body: JSON) -> list[int]:
        return count_of(spec, body)

    def uncounted(self, role: Role) -> int:
        return 0  # the soft prompt's rows are counted apart (soft_rows)

    def known_label_ids(self, word: str) -> list[int] | None:
        if self.label_token_ids is not None and word in self.label_token_ids:
            return [int(t) for t in self.label_token_ids[word]]
        return None

    def needs_label_ids(self, role: Role) -> bool:
        return True

    def model_for(self, role: Role) -> str:
        return self.model

    def info_request(self) -> RequestSpec | None:
        """None when the user stated kind, mask token (masked) and revision: nothing to ask."""
        stated = self.kind is not None and self.revision is not None
        if stated and (self.kind == "causal" or self.mask_token is not None):
            return None
        return RequestSpec(
            role="features", method="GET", base_url=self.base_url, path="/v1/models", body=None
        )

    def with_info(self, body: JSON) -> LocalAdapter:
        spec = RequestSpec(
            role="features", method="GET", base_url=self.base_url, path="/v1/models", body=None
        )
        info = get(spec, body, "data", 0)
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind not in ("masked", "causal"):
            raise malformed(spec, "data[0].kind is neither 'masked' nor 'causal'")
        mask = info.get("mask_token")
        limit = info.get("max_inputs_per_request")
        fp = info.get("fingerprint")
        name = info.get("id")

        def cap(key: str, current: int | None) -> int | None:
            value = info.get(key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            return int(value) if ok else current

        soft = info.get("soft_prompt")
        return replace(
            self,
            soft_prompt=soft if isinstance(soft, dict) else None,
            kind=kind,
            model=name if isinstance(name, str) and name else self.model,
            mask_token=self.mask_token or (mask if isinstance(mask, str) else None),
            revision=fp if isinstance(fp, str) else self.revision,
            max_inputs_per_request=min(self.max_inputs_per_request, limit)
            if isinstance(limit, int) and limit > 0
            else self.max_inputs_per_request,
            max_label_token_ids=cap("max_label_token_ids", self.max_label_token_ids),
            max_scores_per_request=cap("max_scores_per_request", self.max_scores_per_request),
        )

    def hidden_kind(self, role: Role) -> str:
        return "mask_hidden" if self.effective_kind == "masked" else "last_hidden"

    def extra_meta(self) -> dict[str, JSON]:
        return {"kind": self.effective_kind, "encoding_format": self.encoding_format}


def parse_token_ids(spec: RequestSpec, body: JSON) -> list[int]:
    """Token ids from a tokenize answer: ``{"tokens"|"ids"|"token_ids"|"input_ids": [int]}``."""
    if isinstance(body, dict):
        for key in ("tokens", "ids", "token_ids", "input_ids"):
            ids = body.get(key)
            if isinstance(ids, list) and ids and all(type(t) is int for t in ids):
                return list(ids)
    raise malformed(spec, "tokenize answer has no non-empty list of integer token ids")
