"""Request bodies. Unknown fields are ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FeaturesRequest(_Body):
    inputs: list[str] = Field(min_length=1)
    label_token_ids: list[int] = Field(default_factory=list)
    return_hidden: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    model: str | None = None
    prompt_embeds: str | None = None  # a soft prompt (soft_prompt.py)


class TokenizeRequest(_Body):
    text: str | None = None
    texts: list[str] | None = None
    # a conversation (vLLM's form), rendered with the model's chat template as chat completions
    messages: list[Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    model: str | None = None


class CompletionsRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = 1
    logprobs: int | None = None
    echo: bool = False
    logprob_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool = False
    n: int = 1
    stream: bool = False
    temperature: float | None = None


class EmbeddingsRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class FillMaskParameters(_Body):
    targets: list[str] | str | None = None
    top_k: int = 5


class FillMaskRequest(_Body):
    inputs: str | list[str]
    parameters: FillMaskParameters = Field(default_factory=FillMaskParameters)
