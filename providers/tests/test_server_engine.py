"""In-process checks of the engine: kind detection, the fingerprint, special-token wrapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dect_maas_server.engine import InputError, detect_kind, fingerprint, load_engine


def test_detect_kind_from_config() -> None:
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    assert detect_kind(RobertaConfig(architectures=["RobertaForMaskedLM"])) == "masked"
    assert detect_kind(GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal"
    assert detect_kind(LlamaConfig()) == "causal"  # no architectures: by model type
    assert detect_kind(BertConfig()) == "masked"
    assert detect_kind(BertConfig(is_decoder=True)) == "causal"

    class Unknown:
        model_type = "not-a-model"

    with pytest.raises(ValueError, match="--model-kind"):
        detect_kind(Unknown())


def test_fingerprint_follows_weights_and_tokenizer(tiny_masked: Path) -> None:
    engine = load_engine(str(tiny_masked))
    first = engine.fingerprint
    settings = f"max_input_tokens={engine.max_input_tokens}"
    assert first == fingerprint(engine.model, engine.tokenizer, "masked", settings)
    assert first != fingerprint(engine.model, engine.tokenizer, "causal", settings)
    # truncation changes answers: a server restarted with another limit must not share cache keys
    assert load_engine(str(tiny_masked), max_input_tokens=16).fingerprint != first
    assert load_engine(str(tiny_masked)).fingerprint == first
    first = fingerprint(engine.model, engine.tokenizer, "masked")
    with torch.no_grad():
        param = next(engine.model.parameters())
        param[0, 0] += 1e-3
    assert fingerprint(engine.model, engine.tokenizer, "masked") != first
    with torch.no_grad():
        param[0, 0] -= 1e-3
    engine.tokenizer.add_tokens(["zzzq"])
    assert fingerprint(engine.model, engine.tokenizer, "masked") != first


def test_masked_encoding_wraps_specials_and_finds_the_mask(tiny_masked: Path) -> None:
    engine = load_engine(str(tiny_masked), max_input_tokens=12)
    enc = engine.encode("It was <mask>.")
    tok = engine.tokenizer
    assert enc.ids[0] == tok.cls_token_id
    assert enc.ids[-1] == tok.sep_token_id
    assert enc.ids[enc.score_pos] == tok.mask_token_id
    assert not enc.truncated
    long = engine.encode("good " * 30 + "it was <mask> .")
    assert long.truncated
    assert len(long.ids) == 12
    assert long.ids[long.score_pos] == tok.mask_token_id
    with pytest.raises(InputError) as info:
        engine.encode("no mask", index=4)
    assert info.value.index == 4


def test_kind_can_be_forced(tiny_masked: Path) -> None:
    engine = load_engine(str(tiny_masked), kind="causal")
    assert engine.kind == "causal"
    assert type(engine.model).__name__ == "RobertaForCausalLM"
    enc = engine.encode("It was good")
    assert enc.ids[enc.score_pos] != engine.tokenizer.sep_token_id  # the last text token
    with pytest.raises(ValueError, match="masked or causal"):
        load_engine(str(tiny_masked), kind="seq2seq")
