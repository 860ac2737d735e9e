"""Config files: errors name the key and the file; paths resolve against the file.

Reaches inside: the config-file reader and the wiring from config to adapter are under test.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dect_maas import ConfigError, ExperimentConfig
from dect_maas.experiments.config_file import load_config

BASE = """
name = "movies"
shots = [16, 1, 4]
seeds = [0, 1]
methods = ["dect", "zero_shot"]
cache_dir = "cache"
output_dir = "~/somewhere/runs"

[provider]
kind = "local"
base_url = "http://127.0.0.1:8000/"

[task]
template = "{text} In summary, it was {mask}"
label_words = { negative = ["terrible", "bad"], positive = "great" }

[data.train]
path = "data/train.jsonl"

[data.test]
path = "/abs/test.csv"
limit = 100
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    p = tmp_path / "sub" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def test_valid_config_resolves_paths_against_its_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.shots == [1, 4, 16]  # sorted
    assert cfg.seeds == [0, 1]
    assert cfg.methods == ["dect", "zero_shot"]
    assert cfg.provider.base_url == "http://127.0.0.1:8000"
    assert cfg.data.train.path == (tmp_path / "sub" / "data" / "train.jsonl").resolve()
    assert cfg.data.test.path == Path("/abs/test.csv")
    assert cfg.data.test.limit == 100
    assert cfg.cache_dir == (tmp_path / "sub" / "cache").resolve()
    assert cfg.output_dir == Path("~/somewhere/runs").expanduser()
    task = cfg.task.to_task()
    assert task.classes == ("negative", "positive")
    assert task.words("negative") == ("terrible", "bad")


def test_yaml_config_is_equivalent(tmp_path: Path) -> None:
    yaml_text = """
    name: movies
    shots: [16, 1, 4]
    seeds: [0, 1]
    methods: [dect, zero_shot]
    cache_dir: cache
    output_dir: ~/somewhere/runs
    provider: {kind: local, base_url: "http://127.0.0.1:8000/"}
    task:
      template: "{text} In summary, it was {mask}"
      label_words: {negative: [terrible, bad], positive: great}
    data:
      train: {path: data/train.jsonl}
      test: {path: /abs/test.csv, limit: 100}
    """
    assert load_config(write(tmp_path, yaml_text, "exp.yaml")) == load_config(write(tmp_path, BASE))


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(ValueError, match="frozen"):
        cfg.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('kind = "local"', 'kind = "local"\ntimeout = 3', r"provider\.timeout: unknown key"),
        ("limit = 100", 'limit = "many"', r"data\.test\.limit: Input should be a valid integer"),
        ("seeds = [0, 1]", "seeds = [0, 1]\nshotz = [2]", r"shotz: unknown key"),
        ('kind = "local"', 'kind = "grpc"', r"provider\.kind: Input should be 'local'"),
        ("shots = [16, 1, 4]", "shots = [0, 4]", r"shots: shot counts must be positive"),
        ('"dect", "zero_shot"', '"dect", "dect_plus"', r"methods\.1: Input should be"),
        ('path = "data/train.jsonl"', 'path = "data/train.parquet"', r"data\.train: .*jsonl"),
        (
            "[data.test]",
            "[data.tset]",
            r"data\.test: required key is missing; data\.tset: unknown key",
        ),
        ("{mask}", "{mask} extra {text}", r"task: .*two \{text\} slots"),
        ('base_url = "http://127.0.0.1:8000/"', 'base_url = "127.0.0.1"', r"provider\.base_url"),
    ],
)
def test_errors_name_the_key_and_the_file(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_inline_api_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = "sk-live-THIS-IS-SECRET-1234"
    path = write(tmp_path, BASE.replace('kind = "local"', f'kind = "local"\napi_key = "{secret}"'))
    with pytest.raises(ConfigError, match=r"provider\.api_key: inline credentials are refused"):
        load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert secret not in str(info.value)
    assert str(path) in str(info.value)


def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = "sk-live-abc/def+123"
    path = write(
        tmp_path,
        BASE.replace('kind = "local"', f'kind = "openai"\nmodel = "m"\napi_key_env = "{secret}"'),
    )
    with pytest.raises(ConfigError, match=r"provider\.api_key_env: must be the NAME") as info:
        load_config(path)
    assert secret not in str(info.value)
    ok = load_config(
        write(
            tmp_path,
            BASE.replace('kind = "local"', 'kind = "openai"\nmodel = "m"\napi_key_env = "MY_KEY"'),
        )
    )
    assert ok.provider.api_key_env == "MY_KEY"
    assert "MY_KEY" in str(ok.to_public_dict())


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = write(tmp_path, "name = [", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    other = write(tmp_path, BASE, "exp.ini")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(other)
    top = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="table of settings"):
        load_config(top)


def test_hf_dataset_source_needs_a_split(tmp_path: Path) -> None:
    text = BASE.replace('path = "data/train.jsonl"', 'hf_dataset = "sst2"')
    with pytest.raises(ConfigError, match=r"data\.train: .*needs a split"):
        load_config(write(tmp_path, text))
    cfg = load_config(
        write(tmp_path, text.replace('hf_dataset = "sst2"', 'hf_dataset = "sst2"\nsplit = "train"'))
    )
    assert cfg.data.train.describe() == "hf:sst2[train]"


def test_provider_kinds_say_what_they_need(tmp_path: Path) -> None:
    no_model = BASE.replace('kind = "local"', 'kind = "openai"')
    with pytest.raises(ConfigError, match=r"provider: kind 'openai' needs model"):
        load_config(write(tmp_path, no_model))
    no_url = BASE.replace('base_url = "http://127.0.0.1:8000/"', "")
    with pytest.raises(ConfigError, match=r"provider: kind 'local' needs base_url"):
        load_config(write(tmp_path, no_url))


def test_from_dict_defaults() -> None:
    cfg = ExperimentConfig.from_dict(
        {
            "provider": {"base_url": "http://127.0.0.1:1"},
            "task": {"template": "{text} It was {mask}", "label_words": {"a": "x", "b": "y"}},
            "data": {"train": {"path": "t.jsonl"}, "test": {"path": "u.jsonl"}},
        }
    )
    assert cfg.shots == [1, 4, 16]
    assert cfg.seeds == [0, 1, 2]
    assert cfg.methods == ["dect", "zero_shot", "calibrated_zero_shot", "prototype", "linear_probe"]
    assert cfg.decoder.n_steps == 30
    assert cfg.decoder.lr == 0.01
    assert cfg.decoder.projection_dim == 128
    assert cfg.data.train.path == (Path.cwd() / "t.jsonl").resolve()


def test_label_token_ids_only_for_providers_that_take_them(tmp_path: Path) -> None:
    from dect_maas.experiments.wiring import make_adapter

    ids = "label_token_ids = { negative = [1], positive = [2] }"
    hf = BASE.replace('kind = "local"', f'kind = "hf_inference"\nmodel = "roberta-base"\n{ids}')
    with pytest.raises(ConfigError, match=r"provider\.label_token_ids: the hf_inference provider"):
        make_adapter(load_config(write(tmp_path, hf)).provider)
    local = BASE.replace('kind = "local"', f'kind = "local"\n{ids}')
    adapter = make_adapter(load_config(write(tmp_path, local)).provider)
    assert adapter.label_token_ids == {"negative": (1,), "positive": (2,)}
