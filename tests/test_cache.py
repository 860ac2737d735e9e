"""The response cache on a real disk: keys, values, safety, and two processes at once.

Reaches inside for the schema version and the credential-name rule the key checks use.
"""

from __future__ import annotations

import enum
import hashlib
import json
import pickle
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dect_maas import CacheConfig, CacheError, ConfigError, ResponseCache, cache_key
from dect_maas._secrets import is_credential_name
from dect_maas.client.cache import SCHEMA_VERSION

FAKE_KEY = "sk-test-7f3a9c1e5b2d4f60a8e1c3b5d7f9a1c3"


def _files_contain(folder: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in folder.rglob("*") if p.is_file() and data in p.read_bytes()]


# -- keys ----------------------------------------------------------------------------------


def test_cache_key_is_sha256_of_canonical_json() -> None:
    parts = {"b": [1, 2.5, None, True], "a": {"z": "é", "y": (3, 4)}}
    canonical = '{"a":{"y":[3,4],"z":"\\u00e9"},"b":[1,2.5,null,true]}'
    assert cache_key(parts) == hashlib.sha256(canonical.encode("ascii")).hexdigest()


def test_cache_key_ignores_mapping_order_and_sees_every_value() -> None:
    base = {"adapter": "local", "body": {"text": "hi", "ids": [1, 2]}, "model": "m"}
    reordered = {"model": "m", "body": {"ids": [1, 2], "text": "hi"}, "adapter": "local"}
    assert cache_key(base) == cache_key(reordered)
    changed = [
        {**base, "model": "m2"},
        {**base, "body": {"text": "hi", "ids": [2, 1]}},
        {**base, "body": {"text": "hi ", "ids": [1, 2]}},
        {**base, "body": {"text": "hi", "ids": [1, 2.0001]}},
        {**base, "extra": None},
    ]
    keys = {cache_key(p) for p in changed} | {cache_key(base)}
    assert len(keys) == len(changed) + 1
    # True and 1 are different JSON values, so different keys.
    assert cache_key({"x": True}) != cache_key({"x": 1})


@pytest.mark.parametrize(
    "name", ["authorization", "Authorization", "api_key", "API-Key", "x-api-key", "token"]
)
def test_cache_key_refuses_credential_field_names_anywhere(name: str) -> None:
    with pytest.raises(ValueError, match="credential"):
        cache_key({name: "x"})
    with pytest.raises(ValueError, match="credential"):
        cache_key({"request": {"headers": [{"h": {name: "x"}}]}})


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ({"x": float("nan")}, ValueError),
        ({"x": [float("inf")]}, ValueError),
        ({"x": {1: "a"}}, TypeError),
        ({"x": {1, 2}}, TypeError),
        ({"x": b"bytes"}, TypeError),
        ({"x": np.float32(1.0)}, TypeError),
    ],
)
def test_cache_key_refuses_what_json_cannot_say_exactly(parts: Any, error: type) -> None:
    with pytest.raises(error):
        cache_key(parts)


# -- values --------------------------------------------------------------------------------


def test_values_round_trip_with_arrays_and_float_lists(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=576).astype(np.float32)
    matrix = rng.integers(-5, 5, size=(3, 4)).astype(np.int64)
    floats = [0.1, 1e-300, -2.5, 3.0, *rng.normal(size=30).tolist()]
    value = {
        "scores": [-1.25, -0.5],
        "hidden": hidden,
        "matrix": matrix,
        "mask": np.array([True, False]),
        "half": np.arange(4, dtype=np.float16),
        "big_endian": np.arange(3, dtype=">f8"),
        "floats": floats,
        "nested": {"ids": [1, 2, 3], "deep": [{"v": np.zeros((0, 2))}], "name": "ünï"},
        "none": None,
        "scalar": np.float64(2.5),
    }
    key = cache_key({"i": 0})
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set(key, value)
        got = cache.get(key)
    assert got is not None
    assert got["scores"] == [-1.25, -0.5]
    assert got["hidden"].dtype == np.float32
    np.testing.assert_array_equal(got["hidden"], hidden)
    assert got["matrix"].dtype == np.int64
    np.testing.assert_array_equal(got["matrix"], matrix)
    np.testing.assert_array_equal(got["mask"], [True, False])
    np.testing.assert_array_equal(got["half"], np.arange(4, dtype=np.float16))
    np.testing.assert_array_equal(got["big_endian"], [0.0, 1.0, 2.0])
    assert got["floats"] == floats  # exact, and still a list
    assert isinstance(got["floats"], list)
    assert got["nested"]["ids"] == [1, 2, 3]
    assert got["nested"]["deep"][0]["v"].shape == (0, 2)
    assert got["nested"]["name"] == "ünï"
    assert got["none"] is None
    assert got["scalar"] == 2.5
    # Cached arrays are read-only: a caller cannot corrupt a value it shares.
    with pytest.raises(ValueError, match="read-only"):
        got["hidden"][0] = 1.0


def test_large_vectors_are_stored_compactly(tmp_path: Path) -> None:
    """576 float32s take 2,304 bytes as buffers, against about 12 kB as JSON text."""
    hidden = np.random.default_rng(1).normal(size=576).astype(np.float32)
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set(cache_key({"i": 1}), {"hidden": hidden, "scores": [0.0, 1.0]})
        rows = cache._store._cache._sql("SELECT value FROM Cache WHERE key != ?", ("x",)).fetchall()
    sizes = sorted(len(r[0]) for r in rows)
    assert 2304 < sizes[-1] < 2304 + 200


def test_get_many_returns_present_keys_across_chunks(tmp_path: Path) -> None:
    keys = [cache_key({"i": i}) for i in range(1200)]
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set_many(
            {k: {"i": i, "v": np.full(3, i, dtype=np.float32)} for i, k in enumerate(keys[:1100])}
        )
        assert len(cache) == 1100
        got = cache.get_many([*keys, keys[0]])
        assert cache.get(keys[1150]) is None
        assert keys[5] in cache
        assert keys[1150] not in cache
        assert "not a key" not in cache
        assert 42 not in cache
    assert set(got) == set(keys[:1100])
    assert all(got[k]["i"] == i and got[k]["v"][2] == i for i, k in enumerate(keys[:1100]))


def test_set_many_writes_all_or_nothing(tmp_path: Path) -> None:
    good = {cache_key({"i": i}): {"i": i} for i in range(5)}
    bad = {**good, cache_key({"i": 99}): {"obj": object()}}
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        with pytest.raises(TypeError):
            cache.set_many(bad)
        assert len(cache) == 0
        cache.set_many(good)
        assert len(cache) == 5


def test_set_many_new_and_existing_keys_read_back_through_diskcache_itself(
    tmp_path: Path,
) -> None:
    # New keys take one INSERT; a batch with a key already present is replaced entry by entry.
    first = {cache_key({"i": i}): {"i": i, "h": np.arange(4, dtype=np.float32)} for i in range(3)}
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set_many(first)
        key0 = next(iter(first))
        again = {key0: {"i": 100}, cache_key({"i": 3}): {"i": 3}}
        cache.set_many(again)
        assert len(cache) == 4
        assert cache.get(key0) == {"i": 100}
        assert cache.get(cache_key({"i": 2}))["i"] == 2
    # diskcache's own bookkeeping (count and size, kept by its triggers) saw every entry
    with diskcache.Cache(str(tmp_path)) as raw:
        assert len(raw) == 5  # four entries and the schema stamp
        assert raw.volume() > 0
        assert raw.check() == []


def test_keys_must_come_from_cache_key(tmp_path: Path) -> None:
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        for key in ["abc", "Z" * 64, cache_key({}).upper(), "__dect_maas_cache_schema__"]:
            with pytest.raises(ValueError, match="64 lower-case hex"):
                cache.set(key, {"a": 1})
            with pytest.raises(ValueError, match="64 lower-case hex"):
                cache.get(key)


def test_values_with_credential_fields_are_refused(tmp_path: Path) -> None:
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        with pytest.raises(ValueError, match="credential"):
            cache.set(cache_key({"i": 0}), {"headers": {"Authorization": "Bearer x"}})
        # "token" is an ordinary field in values (a label word in a logprob record).
        cache.set(cache_key({"i": 1}), {"top": [{"token": " good", "logprob": -0.1}]})
        assert len(cache) == 1


def test_nothing_is_evicted_past_the_size_limit(tmp_path: Path) -> None:
    """diskcache culls by default once over its size limit; paid responses must stay."""
    config = CacheConfig(tmp_path, size_limit_bytes=10_000)
    keys = [cache_key({"i": i}) for i in range(200)]
    with ResponseCache(config) as cache:
        for i, key in enumerate(keys):
            cache.set(key, {"v": np.full(256, i, dtype=np.float32)})  # 200 x 1 kB >> 10 kB
        assert len(cache) == 200
    with ResponseCache(config) as cache:
        assert len(cache.get_many(keys)) == 200
    assert diskcache.Cache(str(tmp_path)).eviction_policy == "none"


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        CacheConfig("")
    with pytest.raises(ConfigError):
        CacheConfig("x", size_limit_bytes=0)
    with pytest.raises(ConfigError):
        CacheConfig("x", size_limit_bytes=True)
    assert CacheConfig("~/c").path == Path.home() / "c"


# -- what is on disk -----------------------------------------------------------------------


def test_schema_mismatch_is_refused_with_advice(tmp_path: Path) -> None:
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set(cache_key({"i": 0}), {"a": 1})
    raw = diskcache.Cache(str(tmp_path))
    raw.set("__dect_maas_cache_schema__", json.dumps({"schema": SCHEMA_VERSION + 1}).encode())
    raw.close()
    with pytest.raises(CacheError, match=rf"schema version {SCHEMA_VERSION + 1}.*new\s+folder"):
        ResponseCache(CacheConfig(tmp_path))


def test_a_foreign_diskcache_folder_is_refused(tmp_path: Path) -> None:
    raw = diskcache.Cache(str(tmp_path))
    raw.set("someone", b"else")
    raw.close()
    with pytest.raises(CacheError, match="did not write"):
        ResponseCache(CacheConfig(tmp_path))


class _Bomb:
    """Unpickling it would create a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_pickled_entries_are_never_unpickled(tmp_path: Path) -> None:
    folder, witness = tmp_path / "cache", tmp_path / "unpickled"
    key = cache_key({"i": 0})
    ResponseCache(CacheConfig(folder)).close()
    raw = diskcache.Cache(str(folder))
    raw.set(key, _Bomb(str(witness)))  # plain diskcache pickles what is not bytes
    raw.close()
    assert pickle.dumps(_Bomb(str(witness)))  # the bomb is a real pickle
    with ResponseCache(CacheConfig(folder)) as cache:
        with pytest.raises(CacheError, match="pickle"):
            cache.get(key)
        with pytest.raises(CacheError, match="pickle"):
            cache.get_many([key])
    assert not witness.exists()


def test_corrupt_entries_raise_cache_error(tmp_path: Path) -> None:
    key = cache_key({"i": 0})
    ResponseCache(CacheConfig(tmp_path)).close()
    raw = diskcache.Cache(str(tmp_path))
    raw.set(key, b"DMC1\xff\xff\x00\x00{not json")
    raw.close()
    with ResponseCache(CacheConfig(tmp_path)) as cache, pytest.raises(CacheError, match="corrupt"):
        cache.get(key)


def test_no_credential_reaches_the_cache_folder(tmp_path: Path) -> None:
    """A full client-like cycle: the key lives only in the headers, never in parts or values."""
    api_key = FAKE_KEY
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": "m", "prompt": "It was great. Overall it was", "logprobs": 5}
    parts = {"adapter": "openai", "base_url": "https://api.example", "path": "/v1/completions"}
    key = cache_key({**parts, "body": body})
    value = {"scores": [-0.1, -2.3], "hidden": np.ones(576, dtype=np.float32)}
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set(key, value)
        with pytest.raises(ValueError, match="credential"):
            cache_key({**parts, "headers": headers})
        with pytest.raises(ValueError, match="credential"):
            cache.set(cache_key({"i": 1}), {"headers": headers})
        assert cache.get(key) is not None
        assert api_key not in repr(cache)
    assert headers["Authorization"].endswith(api_key)
    assert list(tmp_path.iterdir())
    assert _files_contain(tmp_path, api_key) == []


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from dect_maas import CacheConfig, ResponseCache, cache_key
    folder, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with ResponseCache(CacheConfig(folder)) as cache:
        for lo in range(start, stop, 25):
            batch = {cache_key({"i": i}): {"i": i, "v": np.full(64, i, dtype=np.float32)}
                     for i in range(lo, min(lo + 25, stop))}
            cache.set_many(batch)
            got = cache.get_many(list(batch))
            assert all(got[k]["i"] == v["i"] for k, v in batch.items()), "read back"
            cache.set(cache_key({"shared": lo % 50}), {"by": start})
    print("ok")
    """
)


def test_two_processes_share_one_cache(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(start), str(start + 300)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for start in (0, 300)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        keys = [cache_key({"i": i}) for i in range(600)]
        got = cache.get_many(keys)
        assert len(got) == 600
        assert all(got[k]["v"][0] == i for i, k in enumerate(keys))
        assert len(cache) == 600 + 2  # plus the two shared keys both processes wrote
        assert cache.get(cache_key({"shared": 0}))["by"] in (0, 300)  # type: ignore[index]


def test_a_file_where_the_folder_should_be_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot open"):
        ResponseCache(CacheConfig(blocker))


def test_get_many_checks_every_key(tmp_path: Path) -> None:
    keys = [cache_key({"i": i}) for i in range(10)]
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        for bad in ["x" * 64, keys[0][:-1], keys[0] + "0", b"0" * 64, 7]:
            with pytest.raises(ValueError, match="64 lower-case hex"):
                cache.get_many([*keys[:5], bad, *keys[5:]])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            cache.get_many(keys[0])
        assert cache.get_many([]) == {}


def test_threads_share_one_cache(tmp_path: Path) -> None:
    def work(t: int) -> int:
        mine = {cache_key({"t": t, "i": i}): {"t": t, "v": np.full(8, i)} for i in range(100)}
        for lo in range(0, 100, 10):
            cache.set_many(dict(list(mine.items())[lo : lo + 10]))
        got = cache.get_many(list(mine))
        return sum(int(v["v"][0]) for v in got.values() if v["t"] == t)

    with ResponseCache(CacheConfig(tmp_path)) as cache, ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(work, range(8)))
        assert len(cache) == 800
    assert sums == [sum(range(100))] * 8


def test_values_over_a_mebibyte_live_in_files_and_still_read_back(tmp_path: Path) -> None:
    big = np.arange(300_000, dtype=np.float32)  # 1.2 MB: diskcache keeps it in its own file
    key, small = cache_key({"i": "big"}), cache_key({"i": "small"})
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set_many({key: {"h": big}, small: {"h": big[:3]}})
        got = cache.get_many([key, small])
        assert cache.get(key) is not None
    assert [p.suffix for p in tmp_path.rglob("*.val")] == [".val"]
    np.testing.assert_array_equal(got[key]["h"], big)
    np.testing.assert_array_equal(got[small]["h"], [0.0, 1.0, 2.0])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and a == b


# Names the cache refuses as credentials (e.g. "APIKEY", "secret") have tests of their own.
_names = st.text(min_size=1, max_size=6).filter(lambda k: not is_credential_name(k))
_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_, np.float16]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    elements={"allow_nan": False},
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | _arrays
    | st.lists(st.floats(allow_nan=False), min_size=16, max_size=40)
)
_documents = st.dictionaries(
    _names,
    st.recursive(
        _leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4),
        max_leaves=12,
    ),
    max_size=5,
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResponseCache]:
    with ResponseCache(CacheConfig(tmp_path_factory.mktemp("shared"))) as cache:
        yield cache


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents=st.lists(_documents, min_size=1, max_size=4))
def test_any_json_and_array_document_round_trips(
    shared_cache: ResponseCache, documents: list[dict[str, Any]]
) -> None:
    keys = [cache_key({"doc": json.dumps(repr(d)), "i": i}) for i, d in enumerate(documents)]
    shared_cache.set_many(dict(zip(keys, documents, strict=True)))
    many = shared_cache.get_many(keys)
    for doc, key in zip(documents, keys, strict=True):
        assert _same(doc, many[key])
        assert _same(doc, shared_cache.get(key))


def test_one_corrupt_entry_among_many_is_named(tmp_path: Path) -> None:
    keys = [cache_key({"i": i}) for i in range(5)]
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        cache.set_many({k: {"i": i} for i, k in enumerate(keys)})
    raw = diskcache.Cache(str(tmp_path))
    raw.set(keys[3], b'DMC1\x05\x00\x00\x00{"d":')
    raw.close()
    with ResponseCache(CacheConfig(tmp_path)) as cache:
        with pytest.raises(CacheError, match=f"entry {keys[3][:12]}"):
            cache.get_many(keys)
        assert cache.get_many(keys[:3])[keys[2]] == {"i": 2}


def test_cache_key_takes_any_mapping_and_names_where_a_part_is_bad() -> None:
    class Colour(str, enum.Enum):
        RED = "red"

    as_dict = {"a": {"b": [1, {"c": "red"}]}}
    proxied = {"a": types.MappingProxyType({"b": (1, types.MappingProxyType({"c": Colour.RED}))})}
    assert cache_key(proxied) == cache_key(as_dict)
    with pytest.raises(ValueError, match=r"parts\.a\.b\[1\] has a field named 'Api-Key'"):
        cache_key({"a": {"b": [1, {"Api-Key": "x"}]}})
    with pytest.raises(ValueError, match=r"parts\.a\[2\] is nan"):
        cache_key({"a": [1.0, 2.0, float("nan")]})
