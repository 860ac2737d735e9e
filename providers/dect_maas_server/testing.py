"""Test helpers: tiny local models and a real server process on loopback.

Used by this package's tests and by the client library's tests, so that both talk to the real
server over real HTTP without the hub or a large model. Randomly initialised models are built
from a config with a fixed local seed, so the same call always writes the same weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_WORDS",
    "make_tiny_chat_model",
    "make_tiny_model",
    "run_server",
]

#: The words the tiny tokenizers know as whole tokens (with and without a leading space).
_WORD_TEXT = """
    the a an and or but not no yes it is was were be been this that these those i you he she we
    they me my your his her our their in on at of to for with as by from about into over after
    before under again very so too just really quite movie film story plot acting actor actors
    scene scenes music book song show great terrible good bad awful excellent wonderful boring
    fun funny sad happy love loved hate hated like liked best worst amazing poor fine nice ok
    okay beautiful ugly brilliant dull perfect horrible enjoyable mediocre positive negative
    neutral review summary overall all in summary sentiment topic sports business world science
    technology politics health news question answer true false yes no time people day way
    thing things man woman one two three much many more most some any every each other than
    then there here when where why how what who which would could should will can do did does
    done have has had make made see saw watch watched watching think thought feel felt
"""
TINY_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
_PUNCTUATION = tuple(".,!?;:'\"()-")


def _tokenizer_json(kind: Literal["masked", "causal"]) -> str:
    """Train a byte-level BPE on the built-in word list, so unknown words still tokenize."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if kind == "masked":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "masked" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = sorted(set(TINY_WORDS) | {w.capitalize() for w in TINY_WORDS})
    corpus = [" ".join(words), *(f" {w}" for w in words), *words, " ".join(_PUNCTUATION)]
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    if kind == "masked":
        # As in RoBERTa: "was <mask>" is [" was", "<mask>"], so " great" fills the mask.
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
        sep, cls = tok.token_to_id("</s>"), tok.token_to_id("<s>")
        assert sep is not None
        assert cls is not None
        tok.post_processor = processors.RobertaProcessing(("</s>", sep), ("<s>", cls))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return str(tok.to_str())


def make_tiny_model(kind: Literal["masked", "causal"], path: str | os.PathLike[str]) -> Path:
    """Write a tiny randomly initialised masked or causal LM with its tokenizer to ``path``.

    The masked model is a RoBERTa (``<mask>``, right padding); the causal one a Llama
    (no BOS, like SmolLM2). The same ``kind`` always gives the same weights and tokenizer.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    if kind not in ("masked", "causal"):
        raise ValueError(f"kind must be 'masked' or 'causal', not {kind!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_str(_tokenizer_json(kind))
    model: Any
    tokenizer: Any
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 if kind == "masked" else 4321)
        if kind == "masked":
            tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
                tokenizer_object=backend,
                bos_token="<s>",
                eos_token="</s>",
                cls_token="<s>",
                sep_token="</s>",
                pad_token="<pad>",
                unk_token="<unk>",
                mask_token="<mask>",
                model_max_length=128,
            )
            tokenizer.padding_side = "right"
            masked_config = RobertaConfig(
                vocab_size=backend.get_vocab_size(),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=130,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                type_vocab_size=1,
            )
            model = RobertaForMaskedLM(masked_config)
        else:
            tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
                tokenizer_object=backend,
                bos_token="<|endoftext|>",
                eos_token="<|endoftext|>",
                unk_token="<|endoftext|>",
                pad_token="<|endoftext|>",
                model_max_length=256,
            )
            causal_config = LlamaConfig(
                vocab_size=backend.get_vocab_size(),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            )
            model = LlamaForCausalLM(causal_config)
        # Larger than default weights so that tiny models give well-separated scores.
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embed" not in name:
                torch.nn.init.normal_(param, std=0.2)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


#: A ChatML template (as SmolLM2's, with a shorter system default) for the tiny causal model.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a critic<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_chat_model(path: str | os.PathLike[str]) -> Path:
    """The tiny causal LM with a chat template (``chat_template.jinja``), for chat routes."""
    out = make_tiny_model("causal", path)
    (out / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    return out


_LISTEN_RE = re.compile(r"listening on (http://[0-9.]+:\d+)")


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def run_server(
    model_path: str | os.PathLike[str] | None,
    *,
    api_key: str | None = None,
    startup_timeout: float = 120.0,
    env: dict[str, str] | None = None,
    log: list[str] | None = None,
    **server_options: Any,
) -> Iterator[str]:
    """Run ``python -m dect_maas_server`` on a free loopback port; yield its base URL.

    ``server_options`` become flags (``max_batch_size=4`` -> ``--max-batch-size 4``; ``True``
    -> a bare flag). The key travels in the environment, never on the command line. On exit the
    server is stopped with SIGTERM (then killed); a failed start raises ``RuntimeError`` with
    the server's stderr. Pass a list as ``log`` to collect the server's stderr lines.
    """
    cmd = [sys.executable, "-m", "dect_maas_server", "--host", "127.0.0.1", "--port", "0"]
    if model_path is not None:
        cmd += ["--model", str(model_path)]
    for key, value in server_options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is False or value is None:
            continue
        else:
            cmd += [flag, str(value)]
    child_env = dict(os.environ)
    child_env.pop("DECT_MAAS_SERVER_API_KEY", None)
    child_env.update(env or {})
    if api_key is not None:
        child_env["DECT_MAAS_SERVER_API_KEY"] = api_key
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    lines: list[str] = log if log is not None else []
    found = threading.Event()
    url_box: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = _LISTEN_RE.search(line)
            if m and not url_box:
                url_box.append(m.group(1))
                found.set()

    reader = threading.Thread(target=pump, name="dect-maas-server-stderr", daemon=True)
    reader.start()

    def fail(why: str) -> RuntimeError:
        stderr = "".join(lines[-60:])
        return RuntimeError(f"dect-maas-server {why}; command {cmd!r}; stderr:\n{stderr}")

    try:
        deadline = time.monotonic() + startup_timeout
        while not found.is_set():
            if proc.poll() is not None:
                reader.join(timeout=2)
                raise fail(f"exited with code {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise fail(f"did not start within {startup_timeout:.0f} s")
            found.wait(0.05)
        url = url_box[0]
        while not _health_ok(url):
            if proc.poll() is not None:
                reader.join(timeout=2)
                raise fail(f"exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise fail(f"did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        reader.join(timeout=2)
        if proc.stderr is not None:
            proc.stderr.close()
