"""Adapters: one per kind of API. Pure: they build request specs and parse bodies, never do I/O."""

from ._base import Adapter, Capabilities, Label, Prices, Prompt, RequestSpec
from .hf_inference import HFInferenceAdapter
from .local import LocalAdapter
from .openai_chat import OpenAIChatAdapter
from .openai_compat import OpenAICompatibleAdapter
from .tei import TEIAdapter

__all__ = [
    "Adapter",
    "Capabilities",
    "HFInferenceAdapter",
    "Label",
    "LocalAdapter",
    "OpenAIChatAdapter",
    "OpenAICompatibleAdapter",
    "Prices",
    "Prompt",
    "RequestSpec",
    "TEIAdapter",
]
