"""Soft prompts on ``/v1/features``: a continuous prompt prepended to every input (for BBT).

Black-Box Tuning (Sun et al., ICML 2022) searches a continuous prompt of ``L`` vectors in the
model's input-embedding space, so the server must take embeddings as well as text. The request
field follows vLLM's ``prompt_embeds`` where it fits and departs from it where BBT needs it:

- like vLLM: one base64 string holding a ``(L, H)`` float tensor, ``H`` the model's hidden size;
- unlike vLLM: raw little-endian float32 bytes, not a ``torch.save`` file (unpickling a client's
  bytes would let it run code on the server); the embeddings are *prepended* to the tokens of each
  input (after the tokenizer's own start tokens, if any) instead of replacing the prompt; and one
  soft prompt serves every input of the request (BBT evaluates one candidate on all its shots).

Served for causal LMs (no mask position to keep track of after the insertion); ``/v1/models``
says so under ``soft_prompt``. The forward pass runs outside the batcher (each request has its
own prompt) on the model's own forward with ``logits_to_keep``, which the causal path already
uses; no hook of the batcher's is involved. Soft-prompt requests that arrive while a forward pass
runs are merged into the next one (``SoftPromptBatcher``: every row carries its own request's
prompt), so BBT's population, sent concurrently, is scored in a few passes rather than twenty.
A request whose client went away (its handler cancelled) leaves the queue before its pass starts:
a killed BBT run stops costing forward passes at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .batcher import LabelResult, Metrics, wait_while_held
from .engine import Encoded, Engine

__all__ = [
    "MAX_SOFT_TOKENS",
    "SoftPromptBatcher",
    "SoftPromptError",
    "decode_prompt_embeds",
    "score_with_soft_prompt",
    "soft_prompt_info",
    "soft_prompt_labels",
]

MAX_SOFT_TOKENS = 256


class SoftPromptError(ValueError):
    """A soft prompt the server refuses (the route answers 422 with this message)."""


Arrays = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]


@dataclass(eq=False)  # compared by identity: the queue removes a cancelled job by itself
class _Job:
    items: list[Encoded]
    label_ids: tuple[int, ...]
    prompt: torch.Tensor  # [P, H]
    done: asyncio.Future[Arrays] = field(repr=False)


class SoftPromptBatcher:
    """Merges the soft-prompt requests waiting while a forward pass runs into the next pass.

    Requests share a pass when they ask for the same label ids and have prompts of the same
    length (BBT's candidates do), up to ``max_rows`` inputs; a request larger than that goes
    alone. One pass at a time, so concurrent requests never compete for the cores. With
    ``metrics``, each pass counts in ``queries_total``/``batches_total`` as the batcher's do, and
    the rows of cancelled requests in ``rows_dropped_total``.
    """

    def __init__(
        self,
        engine: Engine,
        max_rows: int = 512,
        *,
        metrics: Metrics | None = None,
        test_hold_file: str | None = None,
    ) -> None:
        self._engine = engine
        self._max_rows = max_rows
        self._metrics = metrics
        self._test_hold_file = test_hold_file
        self._queue: list[_Job] = []
        self._drainer: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Rows queued for a pass not yet started (``/metrics``' ``queue_depth`` counts them)."""
        return sum(len(job.items) for job in self._queue)

    async def score(
        self, items: list[Encoded], label_ids: Sequence[int], prompt: torch.Tensor
    ) -> Arrays:
        job = _Job(items, tuple(label_ids), prompt, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        try:
            return await job.done
        except asyncio.CancelledError:
            # The client went away: a job still queued is never computed; one in the running
            # pass is computed and its result dropped by ``_drain``.
            if job in self._queue:
                self._queue.remove(job)
                if self._metrics is not None:
                    self._metrics.record_dropped(len(job.items))
            raise

    async def _drain(self) -> None:
        while self._queue:
            first = self._queue[0]
            key = (first.label_ids, int(first.prompt.shape[0]))
            batch: list[_Job] = []
            rest: list[_Job] = []
            rows = 0
            for job in self._queue:
                fits = not batch or rows + len(job.items) <= self._max_rows
                if fits and (job.label_ids, int(job.prompt.shape[0])) == key:
                    batch.append(job)
                    rows += len(job.items)
                else:
                    rest.append(job)
            self._queue = rest
            items = [it for job in batch for it in job.items]
            prompts = torch.cat(
                [job.prompt.expand(len(job.items), -1, -1) for job in batch]
            )  # [N, P, H]
            try:
                logits, logprobs, hidden = await asyncio.to_thread(
                    self._pass, items, key[0], prompts
                )
            except Exception as exc:
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            start = 0
            for job in batch:
                end = start + len(job.items)
                if not job.done.done():  # its client may have gone
                    job.done.set_result((logits[start:end], logprobs[start:end], hidden[start:end]))
                start = end

    def _pass(
        self, items: list[Encoded], label_ids: tuple[int, ...], prompts: torch.Tensor
    ) -> Arrays:
        """One forward pass in a worker thread, counted in ``/metrics`` like the batcher's."""
        wait_while_held(self._test_hold_file)
        started, cpu = time.monotonic(), time.thread_time()
        out = score_with_soft_prompt(self._engine, items, label_ids, prompts)
        if self._metrics is not None:
            self._metrics.record_batch(
                len(items), time.monotonic() - started, time.thread_time() - cpu
            )
        return out


async def soft_prompt_labels(
    engine: Engine, items: list[Encoded], req: Any, batcher: SoftPromptBatcher | None = None
) -> tuple[Any, int]:
    """``/v1/features`` with ``prompt_embeds``: the label results and the soft prompt's length."""
    prompt = decode_prompt_embeds(engine, req.prompt_embeds)
    if batcher is not None:
        logits, logprobs, hidden = await batcher.score(items, req.label_token_ids, prompt)
    else:
        logits, logprobs, hidden = await asyncio.to_thread(
            score_with_soft_prompt, engine, items, req.label_token_ids, prompt
        )
    return LabelResult(logits, logprobs, hidden), int(prompt.shape[0])


def soft_prompt_info(engine: Engine) -> dict[str, Any] | None:
    """What ``/v1/models`` declares: None where soft prompts are not served (masked LMs)."""
    if engine.kind != "causal":
        return None
    weight = engine.model.get_input_embeddings().weight
    return {
        "field": "prompt_embeds",
        "encoding": "base64 little-endian float32, shape (L, hidden_size)",
        "placement": "prepended",
        "hidden_size": engine.hidden_size,
        "max_tokens": MAX_SOFT_TOKENS,
        # BBT scales its random projection by the spread of the word embeddings
        "embedding_std": float(weight.detach().float().std()),
    }


def decode_prompt_embeds(engine: Engine, data: str) -> torch.Tensor:
    """The ``(L, H)`` soft prompt of a request; SoftPromptError with the reason on a bad one."""
    if engine.kind != "causal":
        raise SoftPromptError(
            "prompt_embeds is served for causal LMs only; this server's is masked"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SoftPromptError("prompt_embeds is not valid base64") from None
    h = engine.hidden_size
    if not raw or len(raw) % (4 * h):
        raise SoftPromptError(
            f"prompt_embeds holds {len(raw)} bytes, not a whole number of float32 rows of "
            f"hidden size {h}"
        )
    arr = np.frombuffer(raw, dtype="<f4").reshape(-1, h)  # [L, H]
    if arr.shape[0] > MAX_SOFT_TOKENS:
        raise SoftPromptError(
            f"prompt_embeds has {arr.shape[0]} rows; the limit is {MAX_SOFT_TOKENS}"
        )
    if not np.isfinite(arr).all():
        raise SoftPromptError("prompt_embeds holds a value that is not finite")
    return torch.from_numpy(arr.copy())


@torch.inference_mode()
def score_with_soft_prompt(
    engine: Engine, items: Sequence[Encoded], label_ids: Sequence[int], prompt: torch.Tensor
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Label logits ``[N, L]``, their log-softmax ``[N, L]`` and hidden states ``[N, H]``.

    ``prompt`` is one ``[P, H]`` soft prompt for every input, or ``[N, P, H]``, one per input.
    Sequence ``i`` is ``prefix specials | prompt (P rows) | body | suffix``, right-padded, so its
    scoring position moves by ``P`` and nothing attends to padding.
    """
    model = engine.model
    emb = model.get_input_embeddings()
    n, p = len(items), int(prompt.shape[-2])
    width = max(len(it.ids) for it in items) + p
    ids = torch.full((n, width - p), engine.pad_id, dtype=torch.long)  # [N, T]
    attention = torch.zeros((n, width), dtype=torch.long)  # [N, T + P]
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
        attention[i, : len(it.ids) + p] = 1
    tok = emb(ids.to(engine.device))  # [N, T, H]
    soft = prompt.to(device=tok.device, dtype=tok.dtype).expand(n, p, -1)  # [N, P, H]
    k = engine.n_prefix
    x = torch.cat([tok[:, :k], soft, tok[:, k:]], dim=1)  # [N, T + P, H]
    score_pos = torch.tensor(
        [it.score_pos + (p if it.score_pos >= k else 0) for it in items], device=tok.device
    )  # [N]
    rows = torch.arange(n, device=tok.device)
    kwargs: dict[str, Any] = {}
    column = score_pos
    if engine._keep_arg:  # the LM head only at the scoring positions, as the batcher's path
        keep = torch.unique(score_pos)  # [K] sorted
        kwargs["logits_to_keep"] = keep
        column = torch.searchsorted(keep, score_pos)  # [N]
    out = model(
        inputs_embeds=x,
        attention_mask=attention.to(tok.device),
        output_hidden_states=True,
        **kwargs,
    )
    hidden = out.hidden_states[-1][rows, score_pos].float()  # [N, H]
    logits = out.logits[rows, column].float()  # [N, V]
    chosen = logits[:, torch.tensor(list(label_ids), dtype=torch.long, device=logits.device)]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
    return (
        chosen.cpu().numpy(),
        (chosen - lse).cpu().numpy(),
        hidden.cpu().numpy(),
    )
