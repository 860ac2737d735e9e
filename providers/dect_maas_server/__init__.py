"""dect-maas-server: a local HTTP server around a transformers masked or causal LM.

It serves Decoder Tuning features (label-word scores and the hidden state at the scoring
position, one forward pass per input) with dynamic batching, plus OpenAI-compatible completions
and embeddings and Hugging Face style fill-mask. It stands alone: it does not import
``dect_maas``, and ``dect_maas`` reaches it only over HTTP.
"""

__version__ = "0.1.0"

#: Bumped whenever a change to the scoring code can change a returned number; part of the
#: fingerprint, so clients' caches keyed on it are invalidated.
SCORING_VERSION = 2

__all__ = ["SCORING_VERSION", "__version__"]
