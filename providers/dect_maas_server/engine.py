"""The model side: loading, tokenizing with safe truncation, and one padded forward pass.

Everything here is synchronous and runs in the batcher's worker thread (forward) or in request
handlers (tokenizing: one call of the Rust tokenizer per request). Padding is always on the
right, so that position ids are the plain 0..n-1 of every sequence and no real token attends to
padding: an input's result does not depend on what it is batched with.

On a GPU the model is fast enough that the per-query Python work bounds the server, so the
scoring path keeps that work per batch, not per query: the LM head runs only at the scoring
positions, label columns and the log-softmax normaliser are gathered on the device, and one
``(B, H + 2L)`` block comes back to the CPU instead of full-vocabulary rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from . import SCORING_VERSION

ModelKind = Literal["masked", "causal"]
logger = logging.getLogger("dect_maas_server")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class InputError(ValueError):
    """An input the model cannot score (for example no mask token); carries the input's index."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class Encoded:
    """One tokenized input, ready for the forward pass."""

    ids: tuple[int, ...]
    score_pos: int  # index in ``ids`` of the scoring position (mask, or last token)
    truncated: bool


@dataclass
class ItemOutput:
    """What one input's forward pass gives back (float32, on CPU)."""

    logits: torch.Tensor  # [V] raw logits at the scoring position
    logprobs: torch.Tensor  # [V] log-softmax of ``logits``
    hidden: torch.Tensor  # [H] last-layer hidden state at the scoring position
    pooled: torch.Tensor | None  # [H] mean of the last layer over real tokens
    all_logprobs: torch.Tensor | None  # [n, V] next-token log-probs at every position


@dataclass
class Scores:
    """One forward pass's results for a batch of ``B`` items (numpy, float32, on CPU)."""

    label_logits: npt.NDArray[np.float32]  # [B, L] raw logits of the asked label ids
    label_logprobs: npt.NDArray[np.float32]  # [B, L] log-softmax over the vocabulary, same ids
    hidden: npt.NDArray[np.float32]  # [B, H] last-layer hidden state at the scoring position
    full: list[ItemOutput | None]  # full-vocabulary outputs, only for the rows that asked


def detect_kind(config: Any) -> ModelKind:
    """Masked or causal, from the config: ``architectures`` first, then ``is_decoder``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForMaskedLM"):
            return "masked"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    if getattr(config, "is_decoder", False):
        return "causal"
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(
        f"cannot tell whether model type {model_type!r} is a masked or causal LM; "
        "pass --model-kind masked or --model-kind causal"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}") from None


def fingerprint(model: torch.nn.Module, tokenizer: Any, kind: str, settings: str = "") -> str:
    """Hash of the weights (as loaded, dtype included), the tokenizer, the scoring code and the
    server ``settings`` that change answers (the truncation limit): clients key caches on it."""
    h = hashlib.sha256()
    h.update(f"dect-maas-server scoring v{SCORING_VERSION}\n{kind}\n".encode())
    if settings:
        h.update(f"settings {settings}\n".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return "sha256:" + h.hexdigest()[:32]


def _keep_window(length: int, budget: int, score: int) -> list[int]:
    """Indices of ``length`` body tokens to keep within ``budget``, always keeping ``score``.

    Drops from the middle: keeps the start (instructions, the text's beginning) and a window
    around the scoring position (the template's end), which is where prompts put what matters.
    """
    if length <= budget:
        return list(range(length))
    head = budget // 2
    tail = budget - head
    if score < head:
        return [*range(head), *range(length - tail, length)]
    start = min(length - tail, max(head, score - (tail - 1) // 2))
    if not start <= score < start + tail:  # budget too small for a head: window only
        start = max(0, min(length - budget, score - (budget - 1) // 2))
        return list(range(start, start + budget))
    return [*range(head), *range(start, start + tail)]


def _special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. <s> ... </s>)."""
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("cannot tell which special tokens the tokenizer adds around a text")


class Engine:
    """A loaded model with its tokenizer; scoring logic shared by every endpoint."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        kind: ModelKind,
        *,
        name: str,
        max_input_tokens: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kind: ModelKind = kind
        self.name = name
        self.device = device
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0] if head is not None else model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)
        if tokenizer.pad_token_id is not None:
            self.pad_id = int(tokenizer.pad_token_id)
        elif tokenizer.eos_token_id is not None:
            self.pad_id = int(tokenizer.eos_token_id)
        else:
            self.pad_id = 0
        self.mask_id: int | None = None
        self.mask_token: str | None = None
        if kind == "masked":
            if tokenizer.mask_token_id is None:
                raise ValueError("a masked LM needs a tokenizer with a mask token")
            self.mask_id = int(tokenizer.mask_token_id)
            self.mask_token = str(tokenizer.mask_token)
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and model.config.model_type in ("roberta", "xlm-roberta"):
            limit -= 2  # RoBERTa positions start after the padding index
        self.max_input_tokens = (
            min(max_input_tokens, limit) if isinstance(limit, int) else (max_input_tokens)
        )
        self.prefix_ids, self.suffix_ids = _special_wrapping(tokenizer)
        self.n_prefix = len(self.prefix_ids)
        self.n_special = len(self.prefix_ids) + len(self.suffix_ids)
        if self.max_input_tokens <= self.n_special + 1:
            raise ValueError(f"--max-input-tokens {max_input_tokens} leaves no room for text")
        self._keep_arg = (
            kind == "causal" and "logits_to_keep" in inspect.signature(model.forward).parameters
        )
        self._backend = _own_backend(tokenizer)
        self._head_gather = not self._keep_arg and self._head_gather_works()
        self.fingerprint = fingerprint(
            model, tokenizer, kind, settings=f"max_input_tokens={self.max_input_tokens}"
        )

    # -- tokenizing -------------------------------------------------------------------------

    def _bodies(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens: one call of the Rust tokenizer for all ``texts``."""
        if self._backend is not None:
            # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which we never use.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, text: str, index: int = 0, *, for_embedding: bool = False) -> Encoded:
        """Tokenize with special tokens; truncate the body, never at the scoring position."""
        return self._finish(self._bodies([text])[0], index, for_embedding)

    def encode_many(self, texts: Sequence[str], *, for_embedding: bool = False) -> list[Encoded]:
        """``encode`` for each text, tokenized in one call; the first bad input raises."""
        if not texts:
            return []
        bodies = self._bodies(texts)
        return [self._finish(b, i, for_embedding) for i, b in enumerate(bodies)]

    def _finish(self, body: list[int], index: int, for_embedding: bool) -> Encoded:
        budget = self.max_input_tokens - self.n_special
        if self.kind == "masked" and not for_embedding:
            assert self.mask_id is not None
            n_masks = body.count(self.mask_id)
            if n_masks != 1:
                raise InputError(
                    index,
                    f"input {index} has {n_masks} mask tokens ({self.mask_token!r}); "
                    "exactly one is required",
                )
            score = body.index(self.mask_id)
        else:
            if not body and self.n_special == 0:
                raise InputError(index, f"input {index} is empty")
            score = len(body) - 1
        truncated = len(body) > budget
        if truncated:
            if for_embedding:
                keep = list(range(budget))
            else:
                keep = _keep_window(len(body), budget, max(score, 0))
            body = [body[i] for i in keep]
            if score >= 0 and not for_embedding:
                score = keep.index(score)
        ids = [*self.prefix_ids, *body, *self.suffix_ids]
        if self.kind == "masked" and not for_embedding:
            assert self.mask_id is not None
            score_pos = ids.index(self.mask_id)
        elif body:
            # The last body token, not a trailing special token such as BERT's [SEP].
            score_pos = self.n_prefix + len(body) - 1
        else:
            score_pos = len(ids) - 1
        return Encoded(tuple(ids), score_pos, truncated)

    def encode_ids(self, ids: list[int], index: int = 0) -> Encoded:
        """Token ids given by the client (OpenAI prompt as ids): checked and truncated."""
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise InputError(index, f"input {index} has token id {t} outside the vocabulary")
        if not ids:
            raise InputError(index, f"input {index} is empty")
        truncated = len(ids) > self.max_input_tokens
        if truncated:
            keep = _keep_window(len(ids), self.max_input_tokens, len(ids) - 1)
            ids = [ids[i] for i in keep]
        return Encoded(tuple(ids), len(ids) - 1, truncated)

    def piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # -- forward --------------------------------------------------------------------------

    def _head_gather_works(self) -> bool:
        """Whether the LM head can run on the scoring positions only (a pre-hook on the output
        embeddings), checked once on a short input against the plain forward."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Module):
            return False
        body = [t for t in range(self.vocab_size) if t not in (self.pad_id, self.mask_id)][:6]
        ids = [*self.prefix_ids, *body, *self.suffix_ids]
        pos = [self.n_prefix + 2, len(ids) - 1]
        x = torch.tensor([ids, ids], device=self.device)
        try:
            with torch.inference_mode():
                plain = self.model(input_ids=x).logits[[0, 1], pos].float()
                with _gather_at(head, torch.arange(2, device=self.device), torch.tensor(pos)):
                    got = self.model(input_ids=x).logits
        except Exception:  # an architecture that reshapes the head's output: run it everywhere
            logger.debug("LM head gather unavailable", exc_info=True)
            return False
        if tuple(got.shape) != (2, 1, plain.shape[-1]):
            return False
        # A wrong gather is off by the logits' own scale; half precision only by rounding.
        scale = float(plain.abs().max()) + 1.0
        tol = 1e-3 if got.dtype == torch.float32 else 3e-2 * scale
        return bool((got[:, 0].float() - plain).abs().max() <= tol)

    @torch.inference_mode()
    def score(
        self,
        items: Sequence[Encoded],
        *,
        label_ids: Sequence[int] = (),
        full: Sequence[bool] | None = None,
        want_pooled: Sequence[bool] | None = None,
        want_all: Sequence[bool] | None = None,
    ) -> Scores:
        """One right-padded forward pass over ``items``.

        Every row gets the raw logits and log-probs of ``label_ids`` and its hidden state;
        rows with ``full`` also get full-vocabulary outputs (with ``want_pooled``/``want_all``).
        """
        n = len(items)
        full = full or [False] * n
        want_pooled = want_pooled or [False] * n
        want_all = want_all or [False] * n
        lengths = np.fromiter((len(it.ids) for it in items), dtype=np.int64, count=n)
        width = int(lengths.max())
        flat = np.fromiter(
            itertools.chain.from_iterable(it.ids for it in items),
            dtype=np.int64,
            count=int(lengths.sum()),
        )
        real = np.arange(width) < lengths[:, None]  # [B, T]
        ids_np = np.full((n, width), self.pad_id, dtype=np.int64)
        ids_np[real] = flat  # row-major: each row's ids, left-aligned (right padding)
        attention = torch.from_numpy(real.astype(np.int64)).to(self.device)
        score_pos = torch.from_numpy(
            np.fromiter((it.score_pos for it in items), dtype=np.int64, count=n)
        ).to(self.device)  # [B]
        rows = torch.arange(n, device=self.device)
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids_np).to(self.device),
            "attention_mask": attention,
            "output_hidden_states": True,
        }
        need_all = any(want_all)
        keep_positions: torch.Tensor | None = None
        gather: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if not need_all and self._keep_arg:
            # Only the logits at scoring positions: skips most of the LM head's work.
            keep_positions = torch.unique(score_pos)  # [K] sorted
            kwargs["logits_to_keep"] = keep_positions
        elif not need_all and self._head_gather:
            gather = _gather_at(self.model.get_output_embeddings(), rows, score_pos)
        with gather:
            out = self.model(**kwargs)
        last = out.hidden_states[-1]  # [B, T, H], model dtype: gather before widening
        hidden = last[rows, score_pos].float()  # [B, H]
        logits_all = out.logits
        if keep_positions is not None:
            column = torch.searchsorted(keep_positions, score_pos)  # [B]
            logits = logits_all[rows, column].float()  # [B, V]
        elif not need_all and self._head_gather:
            logits = logits_all[:, 0].float()  # [B, V]: the head ran at score_pos only
        else:
            logits = logits_all[rows, score_pos].float()  # [B, V]
        parts = [hidden]
        n_labels = len(label_ids)
        if n_labels:
            chosen = logits[:, torch.tensor(list(label_ids), device=logits.device)]  # [B, L]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, 1]
            parts += [chosen, chosen - lse]
        block = torch.cat(parts, dim=1).cpu().numpy()  # one copy to the host: [B, H + 2L]
        h = self.hidden_size
        hidden_np = block[:, :h]
        results: list[ItemOutput | None] = [None] * n
        full_rows = [r for r in range(n) if full[r]]
        if full_rows:
            index = torch.tensor(full_rows, device=logits.device)
            full_logits = logits[index]  # [F, V]
            full_logprobs = torch.log_softmax(full_logits, dim=-1).cpu()
            full_logits = full_logits.cpu()
            pooled: torch.Tensor | None = None
            if any(want_pooled):
                mask = attention.unsqueeze(-1).float()  # [B, T, 1]
                pooled = ((last.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu()
            hidden_t = torch.from_numpy(hidden_np)
            for k, row in enumerate(full_rows):
                all_lp = None
                if want_all[row]:
                    seq = logits_all[row, : len(items[row].ids)].float()  # [n, V]
                    all_lp = torch.log_softmax(seq, dim=-1).cpu()  # [n, V]
                results[row] = ItemOutput(
                    logits=full_logits[k],
                    logprobs=full_logprobs[k],
                    hidden=hidden_t[row],
                    pooled=pooled[row] if pooled is not None and want_pooled[row] else None,
                    all_logprobs=all_lp,
                )
        return Scores(
            label_logits=block[:, h : h + n_labels],
            label_logprobs=block[:, h + n_labels :],
            hidden=hidden_np,
            full=results,
        )


@contextlib.contextmanager
def _gather_at(head: Any, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Run ``head`` (the output embeddings) on ``[rows, positions]`` only: [B, 1, V] logits."""

    def pre(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x[rows, positions.to(x.device)].unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def _own_backend(tokenizer: Any) -> Any:
    """A private copy of the fast tokenizer's Rust backend, set up as ``tokenizer(text,
    add_special_tokens=False)`` uses it (no truncation, no padding), or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return own


def load_engine(
    model_path: str,
    *,
    kind: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_input_tokens: int = 512,
    name: str | None = None,
) -> Engine:
    """Load a masked or causal LM and its tokenizer from a folder (or a hub id)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one log line per load, not a progress bar
    started = time.monotonic()
    config = AutoConfig.from_pretrained(model_path)
    resolved: ModelKind = detect_kind(config) if kind == "auto" else kind  # type: ignore[assignment]
    if resolved not in ("masked", "causal"):
        raise ValueError(f"--model-kind must be auto, masked or causal, not {kind!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    auto = AutoModelForMaskedLM if resolved == "masked" else AutoModelForCausalLM
    model: Any = auto.from_pretrained(model_path, dtype=torch_dtype)
    model.to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = Engine(
        model,
        tokenizer,
        resolved,
        name=name or Path(str(model_path).rstrip("/")).name or str(model_path),
        max_input_tokens=max_input_tokens,
        device=dev,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model loaded: %s kind=%s params=%.1fM dtype=%s device=%s vocab=%d in %.1f s "
        "fingerprint=%s",
        engine.name,
        resolved,
        n_params / 1e6,
        str(torch_dtype).removeprefix("torch."),
        dev,
        engine.vocab_size,
        time.monotonic() - started,
        engine.fingerprint,
    )
    return engine


def finite(x: float) -> float | None:
    """JSON has no -inf: a log-probability that underflowed becomes null."""
    return x if math.isfinite(x) else None
