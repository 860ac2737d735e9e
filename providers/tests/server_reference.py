"""Reference scores: the tiny models run directly with transformers, one input at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The key of the keyed test server; tests check it never shows up in logs or responses.
API_KEY = "sk-test-4f1d9c0e-never-log-me"


class Reference:
    """The same weights run directly with transformers, one unpadded input at a time."""

    def __init__(self, path: Path, kind: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        self.torch = torch
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        self.model: Any = auto.from_pretrained(path).eval()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.kind = kind

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def run(self, ids: list[int]) -> Any:
        torch = self.torch
        with torch.no_grad():
            return self.model(torch.tensor([ids]), output_hidden_states=True)

    def score(self, ids: list[int]) -> dict[str, Any]:
        """Logits, log-probs and hidden state at the scoring position; mean-pooled last layer."""
        out = self.run(ids)
        mask = self.tokenizer.mask_token_id
        pos = ids.index(mask) if self.kind == "masked" and mask in ids else len(ids) - 1
        logits = out.logits[0, pos]
        last = out.hidden_states[-1][0]
        return {
            "logits": logits,
            "logprobs": self.torch.log_softmax(logits, -1),
            "hidden": last[pos],
            "pooled": last.mean(0),
            "all_logprobs": self.torch.log_softmax(out.logits[0], -1),
        }
