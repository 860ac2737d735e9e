"""Bad input through the real ``dect-maas`` command: one line naming the file, line, key or
value, and the documented exit code; credentials in URLs refused and never shown.

Each case runs ``dect_maas.cli.main`` (or the installed command in a subprocess where the
process's own stdout matters) on real files; nothing here needs a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from movie_config import DATA, local_provider, write_movie_config

from dect_maas import (
    Client,
    ConfigError,
    DecTClassifier,
    Experiment,
    Features,
    FeaturesError,
    LocalAdapter,
    OpenAICompatibleAdapter,
    Task,
    TaskError,
    load_examples,
)
from dect_maas.cli import EXIT_CONFIG, main

SECRET = "s3cr3t-Pa55"


def write_config(folder: Path, *, base_url: str = "http://127.0.0.1:1", train: str = "") -> Path:
    return write_movie_config(
        folder / "exp.toml",
        local_provider(base_url),
        name="bad-input",
        methods=None,
        output_dir=None,
        train=train or DATA / "movies_train.jsonl",
        template="{text} It was {mask}",
    )


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- files that are not UTF-8 ---------------------------------------------------------------------


def test_data_file_not_utf8_names_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"text": "fine", "label": "positive"}\n{"text": "caf\xe9", "label": "x"}\n')
    cfg = write_config(tmp_path, train=str(data))
    assert main(["estimate", str(cfg)]) == EXIT_CONFIG
    line = one_error_line(capsys)
    assert f"{data}, line 2: not valid UTF-8 (byte 0xe9 at column 14)" in line
    assert "UnicodeDecodeError" not in line


def test_csv_data_file_not_utf8(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_bytes(b"text,label\nok,positive\nok,positive\nbad \xff,negative\n")
    with pytest.raises(ConfigError, match=r"train\.csv, line 4: not valid UTF-8 \(byte 0xff"):
        load_examples(data)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    data = tmp_path / "excel.csv"
    data.write_bytes(b"\xef\xbb\xbftext,label\nfine,positive\n")
    assert load_examples(data).texts == ("fine",)


def test_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_bytes(b'name = "x"\n# caf\xe9\n')
    assert main(["estimate", str(cfg)]) == EXIT_CONFIG
    assert "exp.toml, line 2: not valid UTF-8 (byte 0xe9 at column 6)" in one_error_line(capsys)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_input_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    cfg = write_config(tmp_path)
    texts = tmp_path / f"new{suffix}"
    if suffix == ".csv":
        texts.write_bytes(b"text\nfine\n\xc3(\n")
        expected = "line 3: not valid UTF-8 (byte 0xc3 at column 1)"
    else:
        texts.write_bytes(b'{"text": "fine"}\n\n{"text": "\xc3("}\n')
        expected = "line 3: not valid UTF-8 (byte 0xc3 at column 11)"
    model = tmp_path / "model.npz"
    model.write_bytes(b"not read: the input is checked first")
    code = main(["predict", str(model), "--input", str(texts), "--config", str(cfg)])
    assert code == EXIT_CONFIG
    line = one_error_line(capsys)
    assert f"{texts}, {expected}" in line


# -- label words ----------------------------------------------------------------------------------


def test_the_same_label_word_for_two_classes_is_refused() -> None:
    with pytest.raises(TaskError, match="'good' is given for both 'neg' and 'pos'"):
        Task("{text} {mask}", {"neg": ["bad", "good"], "pos": "good"})
    with pytest.raises(TaskError, match="'bad' is given twice for 'neg'"):
        Task("{text} {mask}", {"neg": ["bad", "bad"], "pos": "good"})
    # Different strings are different words, even when a tokenizer may map them alike.
    assert Task("{text} {mask}", {"neg": "good", "pos": "Good"}).n_classes == 2


def test_the_same_label_word_for_two_classes_in_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    text = cfg.read_text(encoding="utf-8").replace('positive = "great"', 'positive = "terrible"')
    cfg.write_text(text, encoding="utf-8")
    assert main(["estimate", str(cfg)]) == EXIT_CONFIG
    line = one_error_line(capsys)
    assert "exp.toml: task: label word 'terrible' is given for both 'negative' and 'positive'" in (
        line
    )


# -- command-line values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (["--port", "99999"], "argument --port: '99999' is not a port; give 0 to 65535"),
        (["--port", "-1"], "argument --port: '-1' is not a port"),
        (["--port", "http"], "argument --port: 'http' is not a port"),
        (["--test-limit", "0"], "argument --test-limit: '0' is not a positive integer"),
        (["--shots", "4", "-2"], "argument --shots: '-2' is not a positive integer"),
    ],
)
def test_demo_flags_out_of_range(
    flags: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", *flags])
    assert info.value.code == EXIT_CONFIG
    line = one_error_line(capsys)
    assert line.startswith("dect-maas demo: error: ")
    assert shown in line
    assert "see 'dect-maas demo --help'" in line


# -- saved files that are not ours ----------------------------------------------------------------


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content", ["pickle", "garbage", "missing"])
def test_predict_on_a_bad_model_file_gives_no_pickle_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    cfg = write_config(tmp_path)
    texts = tmp_path / "new.jsonl"
    texts.write_text('{"text": "fine"}\n', encoding="utf-8")
    model = tmp_path / "model.npz"
    if content == "pickle":
        np.save(tmp_path / "evil.npy", np.array([_Evil()], dtype=object), allow_pickle=True)
        (tmp_path / "evil.npy").rename(model)
    elif content == "garbage":
        model.write_bytes(b"\x80\x04garbage")
    code = main(["predict", str(model), "--input", str(texts), "--config", str(cfg)])
    assert code == EXIT_CONFIG
    out = capsys.readouterr()
    assert "unpickled!" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1
    assert str(model) in lines[0]
    assert "allow_pickle" not in lines[0]
    assert "unsafe" not in lines[0]
    if content == "missing":
        assert "model file not found" in lines[0]
    else:
        assert "not a dect-maas model file" in lines[0]


def test_a_bad_features_file_gives_no_pickle_advice(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.save(tmp_path / "evil.npy", np.array([_Evil()], dtype=object), allow_pickle=True)
    (tmp_path / "evil.npy").rename(path)
    with pytest.raises(FeaturesError) as info:
        Features.load(path)
    assert "allow_pickle" not in str(info.value)
    assert "never unpickles" in str(info.value)
    with pytest.raises(FeaturesError, match="no such file"):
        Features.load(tmp_path / "nothing.npz")
    with pytest.raises(ConfigError, match="no such file"):
        DecTClassifier.load(tmp_path / "nothing.npz")


# -- a closed pipe --------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["estimate", "CFG"], ["estimate", "CFG", "--json"]])
def test_a_closed_pipe_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    """``dect-maas estimate cfg.toml | head -1``: the reader has gone before anything is written."""
    cfg = write_config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dect_maas", *[str(cfg) if a == "CFG" else a for a in args]],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141


# -- credentials in URLs --------------------------------------------------------------------------

CREDENTIAL_URLS = [
    (f"http://user:{SECRET}@127.0.0.1:8000", "http://***@127.0.0.1:8000", "user:password@"),
    (f"http://{SECRET}@127.0.0.1:8000/v1", "http://***@127.0.0.1:8000/v1", "user:password@"),
    (f"https://api.example/v1?api_key={SECRET}", "https://api.example/v1?api_key=***", "query"),
    (f"https://api.example/v1?x=1&Api-Key={SECRET}", "?x=***&Api-Key=***", "query"),
    (f"https://api.example/v1?key={SECRET}", "https://api.example/v1?key=***", "query"),
]


@pytest.mark.parametrize(("url", "masked", "why"), CREDENTIAL_URLS)
def test_credentials_in_a_url_are_refused_in_the_python_api(
    url: str, masked: str, why: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        Client(LocalAdapter(base_url=url), cache=None, ledger=tmp_path / "ledger")
    msg = str(info.value)
    assert msg.startswith("LocalAdapter.base_url ")
    assert masked in msg
    assert why in msg
    assert "api_key_env" in msg
    assert SECRET not in msg
    assert SECRET not in repr(info.value)
    with pytest.raises(ConfigError, match=r"OpenAICompatibleAdapter\.embeddings_base_url") as info:
        OpenAICompatibleAdapter(base_url="http://127.0.0.1:1", model="m", embeddings_base_url=url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("url", "masked", "why"), CREDENTIAL_URLS)
def test_credentials_in_a_url_are_refused_in_configs_and_the_cli(
    url: str, masked: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, base_url=url)
    with pytest.raises(ConfigError) as info:
        Experiment.from_config(cfg)
    assert SECRET not in str(info.value)
    assert main(["estimate", str(cfg)]) == EXIT_CONFIG
    line = one_error_line(capsys)
    assert "exp.toml: provider.base_url: " in line
    assert masked in line
    assert why in line
    assert SECRET not in line
    assert not (tmp_path / "ledger").exists()  # refused before anything was opened


def test_a_query_string_in_a_base_url_is_refused_with_its_values_masked(tmp_path: Path) -> None:
    # Paths are appended to a base URL, so a query there could only make wrong URLs.
    with pytest.raises(ConfigError, match=r"\?api-version=\*\*\* must not have a query string"):
        LocalAdapter(base_url="https://x.example/v1?api-version=2024-01-01")
    with pytest.raises(ConfigError, match="not a valid URL"):
        LocalAdapter(base_url="http://127.0.0.1:99999")


def test_a_plain_url_is_kept() -> None:
    adapter = LocalAdapter(base_url="https://api.example:8443/v1/")
    assert adapter.base_url == "https://api.example:8443/v1/"
