"""OpenAI-compatible chat completions: the route most hosted models are reached through.

Scores come from ``POST {base}/chat/completions`` with ``max_tokens: 1, temperature: 0,
logprobs: true, top_logprobs: k`` (k at most 20, OpenAI's cap): the top-k candidates for the first
assistant token. The task renders to messages: an optional system message, then the template
(without ``{mask}``, which a causal template ends with) as the user message; the label is what the
assistant answers first.

Surface forms. A chat model answers "positive", "Positive" or " positive" (label words in chat have
no leading space; ``label_word_prefix`` is stripped). Each label word's score combines the forms
found among the candidates by **logsumexp**: the forms are distinct tokens, so the probability that
the model answers with the word is the sum of theirs (``combine="max"`` keeps the best single form,
DecT's own rule across label words). A word none of whose forms is returned is *censored*: it gets
the k-th value (an upper bound), as are OpenAI's ``-9999.0`` sentinels. With
``exact_token_ids=True`` vLLM's ``logprob_token_ids`` reports the label word's own first token
exactly (one form, no combination).

Models that refuse logprobs (OpenAI's reasoning models: o-series, gpt-5) are refused before any
query is sent; an embeddings-only run (``scores=False`` with an embeddings endpoint) serves them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from dect_maas._task import Task

from ._base import (
    JSON,
    Capabilities,
    Label,
    Prompt,
    RequestSpec,
    Role,
    estimate_tokens,
    get,
    malformed,
    number,
    refuse,
)
from .openai_compat import _TOKENIZE, OpenAICompatibleAdapter, _prompt_tokens, server_root

__all__ = ["OPENAI_TOP_LOGPROBS_MAX", "OpenAIChatAdapter", "surface_forms"]

#: OpenAI's cap on ``top_logprobs`` for chat (Ollama and Together share it).
OPENAI_TOP_LOGPROBS_MAX = 20
#: OpenAI's value for a logprob it does not report.
SENTINEL = -9999.0
#: Tokens reserved per conversation beyond its text: role markers and a template's default system
#: message (SmolLM2's is 15 tokens), so the budget's worst case still bounds what is billed.
CHAT_OVERHEAD = 64
_NO_LOGPROBS = re.compile(r"^(o[1-9]([-.].*)?|gpt-5.*)$")


def surface_forms(word: str) -> tuple[str, ...]:
    """The spellings a chat model may answer a label word with: as given, lower-case and
    capitalised, each with and without a leading space (in that order, without repeats)."""
    w = word.strip()
    bare = dict.fromkeys([w, w.lower(), w[:1].upper() + w[1:]])
    return tuple(dict.fromkeys([*bare, *(" " + b for b in bare)]))


def refuses_logprobs(model: str) -> bool:
    """OpenAI reasoning models (o1, o3, o4-mini, gpt-5 ...) answer logprobs requests with 400."""
    return bool(_NO_LOGPROBS.match(model.rsplit("/", 1)[-1].lower()))


@dataclass(frozen=True)
class OpenAIChatAdapter(OpenAICompatibleAdapter):
    """Adapter for ``/chat/completions`` logprobs (+ ``/embeddings`` for vectors).

    ``system``: an optional system message. ``combine``: how a label word's surface forms make one
    score (``"logsumexp"`` or ``"max"``); ``surface_forms=False`` matches the word only as
    written. Label ids are needed only for ``exact_token_ids`` (``tokenize_api`` defaults to
    ``"none"``: candidates are matched by string).
    """

    system: str | None = None
    combine: Literal["logsumexp", "max"] = "logsumexp"
    surface_forms: bool = True
    tokenize_api: Literal["llama-cpp-python", "vllm", "llama.cpp", "dect-maas", "none"] = "none"
    provider: str = "openai-chat"

    name: ClassVar[str] = "openai-chat"
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top_logprobs <= OPENAI_TOP_LOGPROBS_MAX:
            raise ValueError(
                f"top_logprobs must be between 1 and {OPENAI_TOP_LOGPROBS_MAX} for chat "
                f"completions, not {self.top_logprobs}"
            )
        if self.combine not in ("logsumexp", "max"):
            raise ValueError(f"combine must be 'logsumexp' or 'max', not {self.combine!r}")

    def capabilities(self, role: Role) -> Capabilities:
        caps = super().capabilities(role)
        if role == "vectors":
            return caps
        return Capabilities(
            scores=caps.scores,
            vectors="none",
            max_inputs_per_request=1,  # chat takes one conversation per request
            score_kind="logprobs",
            top_k=caps.top_k,
            masked_lm=False,
        )

    def roles(self, task: Task) -> tuple[Role, ...]:
        if self.scores and refuses_logprobs(self.model):
            raise refuse(
                self.name,
                f"model {self.model!r} does not return logprobs (reasoning models refuse them), "
                "so it cannot score label words; run embeddings-only instead (scores=False with "
                'an embeddings model, or kind = "embeddings" in a config)',
            )
        return super().roles(task)

    def endpoint(self, role: Role) -> tuple[str, str]:
        if role == "vectors":
            return super().endpoint(role)
        return self.base_url, self._route("chat/completions")

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": prompt}]

    def _scores_body(self, prompt: str | list[str], labels: Sequence[Label]) -> dict[str, JSON]:
        assert isinstance(prompt, str)  # one conversation per request (capabilities)
        body: dict[str, JSON] = {
            "model": self.model,
            "messages": self.messages(prompt),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.exact_token_ids:
            body["logprob_token_ids"] = [lab.first for lab in labels]
            body["return_tokens_as_token_ids"] = True
        body.update(self.extra_body)
        return body

    def build_requests(
        self, role: Role, prompts: Sequence[Prompt], labels: Sequence[Label]
    ) -> list[RequestSpec]:
        specs = super().build_requests(role, prompts, labels)
        if role == "vectors":
            return specs
        # the chat template adds role markers and, for some models, a default system message
        system = estimate_tokens(self.system) if self.system else 0
        return [replace(s, input_tokens=s.input_tokens + system + CHAT_OVERHEAD) for s in specs]

    def parse_response(
        self, spec: RequestSpec, status: int, headers: Mapping[str, str], body: JSON
    ) -> list[dict[str, JSON]]:
        if spec.role == "vectors":
            return super().parse_response(spec, status, headers, body)
        choices = get(spec, body, "choices")
        if not isinstance(choices, list) or len(choices) != 1 or len(spec.indices) != 1:
            raise malformed(spec, "'choices' is not a list of one choice")
        logprobs = get(spec, choices[0], "logprobs")
        if logprobs is None:
            raise malformed(
                spec,
                "choices[0].logprobs is null: this server or model gives no logprobs on chat; "
                "use an embeddings-only run",
            )
        content = get(spec, logprobs, "content")
        if not isinstance(content, list) or not content:
            raise malformed(spec, "choices[0].logprobs.content is not a non-empty list")
        top = get(spec, content[0], "top_logprobs")
        if not isinstance(top, list):
            raise malformed(spec, "choices[0].logprobs.content[0].top_logprobs is not a list")
        table: dict[str, float] = {}
        for j, item in enumerate(top):
            token = get(spec, item, "token")
            if not isinstance(token, str):
                raise malformed(spec, f"top_logprobs[{j}].token is not a string")
            value = number(spec, get(spec, item, "logprob"), f"top_logprobs[{j}].logprob")
            if value > SENTINEL:  # -9999.0: not reported
                table[token] = max(value, table.get(token, -math.inf))
        if not table:
            raise malformed(spec, "choices[0].logprobs.content[0].top_logprobs has no logprob")
        floor = min(table.values())
        scores, censored = [], []
        for lab in spec.labels:
            score = self._score(table, lab)
            scores.append(floor if score is None else score)
            censored.append(score is None)
        tokens = _prompt_tokens(body, 1)
        return [{"s": scores, "c": censored, "h": None, "t": tokens[0], "fp": None}]

    def _score(self, table: Mapping[str, float], label: Label) -> float | None:
        """The label word's score from the candidates, or None when no form of it is there."""
        if self.exact_token_ids:
            return table.get(f"token_id:{label.first}")
        forms = surface_forms(label.text) if self.surface_forms else (label.text.strip(),)
        found = []
        for form in forms:
            value = table.get(form)
            if value is None and label.multi_token:
                # the first piece of a word of several tokens: the longest candidate starting it
                pieces = [k for k in table if k.strip() and form.startswith(k)]
                value = table[max(pieces, key=len)] if pieces else None
            if value is not None:
                found.append(value)
        if not found:
            return None
        if self.combine == "max":
            return max(found)
        top = max(found)
        return top + math.log(sum(math.exp(v - top) for v in found))

    def tokenize_request(self, text: str) -> RequestSpec | None:
        # chat answers carry no leading space: resolve the ids of the word as the model answers it
        return super().tokenize_request(text.strip())

    def known_label_ids(self, word: str) -> list[int] | None:
        if self.label_token_ids is not None:
            for key in (word, word.strip()):
                if key in self.label_token_ids:
                    return [int(t) for t in self.label_token_ids[key]]
        if self.tokenizer is not None:
            return [int(t) for t in self.tokenizer(word.strip())]
        return None

    def count_requests(self, role: Role, texts: Sequence[str]) -> list[RequestSpec]:
        """vLLM's ``/tokenize`` and dect-maas-server's ``/v1/tokenize`` take the conversation
        itself (``messages``, rendered with the model's chat template): exact. llama.cpp's
        routes count text only: the user message, the template's overhead apart (``uncounted``)."""
        if role == "vectors" or self.tokenize_api not in ("vllm", "dect-maas"):
            return super().count_requests(role, texts)
        base = server_root(self.base_url)
        path = _TOKENIZE[self.tokenize_api][0]
        return [
            RequestSpec(
                role=role,
                method="POST",
                base_url=base,
                path=path,
                body={
                    "model": self.model,
                    "messages": self.messages(text),
                    "add_generation_prompt": True,
                },
                indices=(i,),
            )
            for i, text in enumerate(texts)
        ]

    def uncounted(self, role: Role) -> int:
        if role == "vectors" or self.tokenize_api in ("vllm", "dect-maas"):
            return 0
        return (estimate_tokens(self.system) if self.system else 0) + CHAT_OVERHEAD

    def extra_meta(self) -> dict[str, JSON]:
        extra = super().extra_meta()
        extra.update(
            route="chat",
            combine=self.combine if self.surface_forms else "as-written",
            system=self.system,
        )
        return extra
