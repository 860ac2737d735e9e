"""The response cache: one entry per example, so a paid query is never paid again.

Keys are sha256 hex digests of canonical JSON (``cache_key``) built by the client from everything
that changes an answer, never from a credential. Values are stored as bytes that hold JSON plus
raw little-endian array buffers (no pickle anywhere: a cache folder shared with others cannot run
code when read). The store is diskcache (SQLite underneath), opened with eviction off, because every
entry was paid for; it is safe for several threads and processes at once. diskcache is reached
through its public API only (``get``, ``set``, ``transact``), so any 5.x or later release serves.

Value format (``_encode_value``/``_decode_value``)::

    b"DMC1" | uint32 little-endian header length | header JSON (UTF-8) | array buffers

The header is ``{"d": document, "a": [[path, dtype, shape, offset, nbytes, kind], ...]}``: each
array (a numpy array, or a long list of floats) is replaced by ``null`` in the document and its
bytes are appended after the header. Decoding a 576-float vector is then a slice, not a JSON
float parse.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from types import TracebackType
from typing import Any

import diskcache
import numpy as np

from dect_maas._exceptions import CacheError, ConfigError
from dect_maas._secrets import is_credential_name

from .storage import POSTGRES_INSTALL_HINT, CacheStore, is_database_url, parse_database_url

__all__ = [
    "SCHEMA_VERSION",
    "CacheConfig",
    "ResponseCache",
    "cache_key",
]

logger = logging.getLogger("dect_maas")

SCHEMA_VERSION = 1
CLAIM_WAIT_S = 300.0
"""How long ``claim_many`` waits for an example another live process is paying for."""
"""Version of the value format and key recipe; a cache written with another one is refused."""

_SCHEMA_KEY = "__dect_maas_cache_schema__"
_MAGIC = b"DMC1"
_HEADER_LEN = 4  # bytes of the uint32 header length that follows the magic
_KEY_CHARS = frozenset("0123456789abcdef")
_HEX_RUN = re.compile("[0-9a-f]*")
# Lists of floats at least this long are stored as float64 buffers (exact) instead of JSON text.
_FLOAT_LIST_MIN = 16
_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)
_DTYPE_OBJECTS = {name: np.dtype(name) for name in _DTYPES}
# Values up to this size live inside SQLite rather than in one file each: faster bulk reads.
_MIN_FILE_SIZE = 2**20

# A key-part mapping with a field named like a credential (dect_maas._secrets) is refused, so a
# secret can never be hashed into (or leak through) a cache key. In values, the bare word "token"
# is allowed: token-level logprob records use it for label words.
_VALUE_NAMES_ALLOWED = frozenset({"token"})


@dataclass(frozen=True)
class CacheConfig:
    """Where the response cache lives: a folder, or a ``postgresql://`` URL (``storage.py``).

    ``size_limit_bytes`` is only diskcache's bookkeeping ceiling: eviction is always off, since
    every entry was paid for. Put ``directory`` on a local disk (SQLite over NFS is not safe).
    """

    directory: Path | str
    size_limit_bytes: int = 2**40

    def __post_init__(self) -> None:
        if not str(self.directory):
            raise ConfigError("CacheConfig.directory must name a folder")
        if is_database_url(self.directory):
            parse_database_url(str(self.directory), "CacheConfig.directory")
        if isinstance(self.size_limit_bytes, bool) or not isinstance(self.size_limit_bytes, int):
            raise ConfigError("CacheConfig.size_limit_bytes must be an int")
        if self.size_limit_bytes <= 0:
            raise ConfigError(
                f"CacheConfig.size_limit_bytes must be positive, got {self.size_limit_bytes}"
            )

    @property
    def path(self) -> Path:
        """The folder (for a ``postgresql://`` URL, use ``ResponseCache.location``)."""
        return Path(os.path.expanduser(self.directory))


def cache_key(parts: Mapping[str, Any]) -> str:
    """The sha256 hex digest of ``parts`` as canonical JSON.

    Canonical: sorted keys, no spaces, ASCII only, tuples as lists. Only JSON types are accepted
    (str keys, str/int/float/bool/None, lists, tuples, mappings); NaN and infinities are refused, as
    is any mapping key named like a credential (``authorization``, ``api_key``, ``token``, ...).
    """
    if not isinstance(parts, Mapping):
        raise TypeError(f"cache_key expects a mapping, got {type(parts).__name__}")
    try:
        plain_already = _check_key_part(parts)
    except _BadKeyPart as bad:
        where = "parts" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in reversed(bad.path)
        )
        raise bad.error_type(bad.message.format(where=where)) from None
    plain = parts if plain_already else _plain(parts)
    text = json.dumps(
        plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return sha256(text.encode("ascii")).hexdigest()


class _BadKeyPart(Exception):
    """A bad key part; its path is collected on the way out, so a valid key pays nothing."""

    def __init__(self, error_type: type[Exception], message: str) -> None:
        self.error_type, self.message = error_type, message
        self.path: list[str | int] = []


_JSON_SCALARS = frozenset([str, int, bool, type(None)])


def _check_key_part(obj: Any) -> bool:
    """Validate a key part; True when json.dumps can take it as it is (no non-dict mappings)."""
    kind = type(obj)
    if kind in _JSON_SCALARS:
        return True
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise _BadKeyPart(
                ValueError, f"cache key part {{where}} is {obj!r}; only finite numbers are allowed"
            )
        return True
    if isinstance(obj, Mapping):
        plain = kind is dict
        for k, v in obj.items():
            if type(k) is not str:
                raise _BadKeyPart(TypeError, f"cache key part {{where}} has a non-str key {k!r}")
            if is_credential_name(k):
                raise _BadKeyPart(
                    ValueError,
                    f"cache key part {{where}} has a field named {k!r}, which may hold a "
                    "credential; credentials must never be part of a cache key",
                )
            try:
                plain = _check_key_part(v) and plain
            except _BadKeyPart as bad:
                bad.path.append(k)
                raise
        return plain
    if isinstance(obj, (list, tuple)):
        plain = True
        for i, v in enumerate(obj):
            try:
                plain = _check_key_part(v) and plain
            except _BadKeyPart as bad:
                bad.path.append(i)
                raise
        return plain
    if isinstance(obj, (str, int)):  # subclasses such as enum members: JSON writes their value
        return True
    raise _BadKeyPart(
        TypeError,
        f"cache key part {{where}} has type {kind.__name__}; use JSON types "
        "(str, int, float, bool, None, list, tuple, mapping)",
    )


def _plain(obj: Any) -> Any:
    """A copy with every mapping as a dict (json.dumps takes only dicts)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class _BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that stores str keys and bytes values only, and never unpickles."""

    def put(self, key: Any) -> Any:
        if type(key) is not str:
            raise TypeError(f"response cache keys are str, got {type(key).__name__}")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise CacheError("the response cache holds a pickled key; refusing to unpickle it")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if type(value) is not bytes or read:
            raise TypeError(f"response cache values are bytes, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY) or read:
            raise CacheError(
                f"the response cache holds an entry of diskcache mode {mode} (not raw bytes); "
                "refusing to read it (it could be a pickle)"
            )
        return super().fetch(mode, filename, value, read)


class _DiskcacheStore:
    """The embedded backend: a diskcache folder, eviction off (every entry was paid for)."""

    def __init__(self, config: CacheConfig) -> None:
        directory = config.path
        self.location = str(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(
                str(directory),
                disk=_BytesOnlyDisk,
                eviction_policy="none",
                size_limit=config.size_limit_bytes,
                disk_min_file_size=_MIN_FILE_SIZE,
                statistics=0,
                tag_index=0,
            )
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the response cache at {directory}: {exc}") from exc
        # diskcache ignores misspelt settings; check that the one that matters took hold.
        if self._cache.eviction_policy != "none":
            self._cache.close()
            raise CacheError(f"the response cache at {directory} would evict entries")

    def stamp(self, value: bytes) -> bytes | None:
        with self._cache.transact():
            # Stamp a new folder atomically: processes opening it together all see one stamp.
            if _SCHEMA_KEY not in self._cache and len(self._cache) == 0:
                self._cache.set(_SCHEMA_KEY, value)
        try:
            found = self._cache.get(_SCHEMA_KEY)
        except CacheError:
            return None
        return found if isinstance(found, bytes) else None

    def get(self, key: str) -> bytes | None:
        raw = self._cache.get(key)
        return raw if raw is None else bytes(raw)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        # diskcache's public get, one key at a time: with eviction off a read is one indexed
        # SELECT and writes nothing (benchmarks/bench_cache.py: well above 20,000 examples/s).
        get = self._cache.get
        out: dict[str, bytes] = {}
        for key in keys:
            raw = get(key)
            if raw is not None:
                out[key] = raw
        return out

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if len(items) == 1:
            self._cache.set(*items[0])
            return
        with self._cache.transact():
            for key, data in items:
                self._cache.set(key, data)

    def claim(
        self, keys: list[str], owner: Any, take_over: bool = False
    ) -> tuple[dict[str, bytes], list[str]]:
        return self.get_many(keys), []  # one machine's folder: no claims (see claim_many)

    def release_claims(self, owner: Any) -> None:
        pass

    def contains(self, key: str) -> bool:
        return key in self._cache

    def count(self) -> int:
        return max(0, len(self._cache) - 1)  # minus the schema stamp

    def keys(self) -> Iterator[str]:
        return (k for k in self._cache.iterkeys() if k != _SCHEMA_KEY)

    def close(self) -> None:
        self._cache.close()


class ResponseCache:
    """Per-example provider responses, keyed by ``cache_key`` digests.

    Values are JSON-like mappings; numpy arrays inside them come back as read-only numpy arrays
    of the same dtype and shape, long float lists come back as exact float lists. Safe to share
    between threads and processes. ``config.directory`` is a folder (the embedded diskcache
    store) or a ``postgresql://`` URL (a database shared by several machines; see ``storage.py``).
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self._store: CacheStore = (
            _postgres_store(str(config.directory))
            if is_database_url(config.directory)
            else _DiskcacheStore(config)
        )
        self.location = self._store.location
        """The cache folder, or its database URL as it may be shown."""
        self._claimant = _claimant() if is_database_url(config.directory) else None
        self._claimed = False
        try:
            self._check_schema()
        except BaseException:
            self._store.close()
            raise

    def _check_schema(self) -> None:
        stamp = json.dumps({"schema": SCHEMA_VERSION, "library": "dect-maas"}).encode()
        raw = self._store.stamp(stamp)
        try:
            found = json.loads(raw)["schema"]  # type: ignore[arg-type]
        except (TypeError, ValueError, KeyError) as exc:
            raise CacheError(
                f"{self.location} holds a cache that dect-maas did not write; "
                "point CacheConfig.directory at an empty or dect-maas folder"
            ) from exc
        if found != SCHEMA_VERSION:
            raise CacheError(
                f"the response cache at {self.location} has schema version {found}, this "
                f"dect-maas reads version {SCHEMA_VERSION}. Point CacheConfig.directory at a new "
                "folder (the old responses stay where they are; a matching dect-maas can read "
                "them), or delete that folder to start afresh."
            )

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored value for ``key``, or None when absent."""
        _check_key(key)
        raw = self._store.get(key)
        if raw is None:
            return None
        return _decode_value(raw, key)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored values for those of ``keys`` that are present (absent keys are left out).

        The path for cache hits in bulk; each key is asked once, duplicates or not.
        """
        _check_keys(keys)
        return _decode_many(self._fetch_raw_many(list(dict.fromkeys(keys))))

    def _fetch_raw_many(self, keys: list[str]) -> dict[str, bytes]:
        return self._store.get_many(keys)

    def claim_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``get_many`` for a caller about to pay for the missing keys.

        On a database shared by several machines, the missing keys are claimed for this cache
        until their answers are stored (or it closes), and keys another live process has
        claimed are waited for (at most ``CLAIM_WAIT_S``, then claimed here): two machines
        that miss the same example at the same moment pay for it once. The embedded folder
        has no claims: it is ``get_many``.
        """
        _check_keys(keys)
        wanted = list(dict.fromkeys(keys))
        if self._claimant is None:
            return self.get_many(wanted)
        self._claimed = True
        found, waiting = self._store.claim(wanted, self._claimant)
        deadline = time.monotonic() + CLAIM_WAIT_S
        pause = 0.05
        while waiting:
            time.sleep(pause)
            pause = min(1.0, pause * 2)
            late = time.monotonic() > deadline
            more, waiting = self._store.claim(waiting, self._claimant, take_over=late)
            found.update(more)
        return _decode_many(found)

    def set(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key`` (replacing any previous value)."""
        _check_key(key)
        self._store.set_many([(key, _encode_value(value))])

    def set_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Store several values in one transaction: all of them are written, or none."""
        encoded = []
        for key, value in items.items():
            _check_key(key)
            encoded.append((key, _encode_value(value)))
        self._store.set_many(encoded)

    def keys(self) -> Iterator[str]:
        """Every stored key (for copying a cache elsewhere)."""
        return self._store.keys()

    def get_raw_many(self, keys: list[str]) -> dict[str, bytes]:
        """Encoded values as stored (for copying a cache elsewhere without decoding)."""
        _check_keys(keys)
        return self._store.get_many(keys)

    def set_raw_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store encoded values as they are, after checking each one decodes."""
        for key, raw in items:
            _check_key(key)
            _decode_value(raw, key)
        self._store.set_many(items)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not _is_key(key):
            return False
        return self._store.contains(key)

    def __len__(self) -> int:
        return self._store.count()

    def close(self) -> None:
        try:
            if self._claimant is not None and self._claimed:
                self._store.release_claims(self._claimant)
        except CacheError as exc:  # left to expire, or to be taken over once this process ends
            logger.warning("could not release this process's cache claims: %s", exc)
        finally:
            self._store.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if is_database_url(self.config.directory):
            return f"ResponseCache(url={self.location!r})"
        return f"ResponseCache(directory={self.location!r})"


def _claimant() -> Any:
    from .pg import Claimant

    return Claimant()


def _postgres_store(url: str) -> CacheStore:
    try:
        from .pg import PgCacheStore
    except ImportError:
        raise ConfigError(POSTGRES_INSTALL_HINT) from None
    return PgCacheStore(url)


def _is_key(key: str) -> bool:
    return len(key) == 64 and _KEY_CHARS.issuperset(key)


def _check_keys(keys: Sequence[str]) -> None:
    """``_check_key`` for many keys at C speed (one length set, one regex over the joined keys)."""
    if not isinstance(keys, Sequence) or isinstance(keys, str):
        raise TypeError("keys must be a sequence of str")
    try:
        ok = not set(map(len, keys)) - {64} and _HEX_RUN.fullmatch("".join(keys)) is not None
    except TypeError:
        ok = False
    if not ok:
        for key in keys:
            _check_key(key)


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not _is_key(key):
        raise ValueError(
            "response cache keys are 64 lower-case hex characters (from cache_key()), got "
            f"{type(key).__name__} of length {len(key) if isinstance(key, str) else '?'}"
        )


def _encode_value(value: Mapping[str, Any]) -> bytes:
    if not isinstance(value, Mapping):
        raise TypeError(f"cache values are mappings, got {type(value).__name__}")
    arrays: list[list[Any]] = []
    buffers: list[bytes] = []
    offset = 0

    def walk(obj: Any, path: list[str | int]) -> Any:
        nonlocal offset
        if obj is None or isinstance(obj, (str, bool, int, float)):
            return obj
        if isinstance(obj, np.ndarray) or (
            type(obj) is list and len(obj) >= _FLOAT_LIST_MIN and all(type(x) is float for x in obj)
        ):
            kind = "list" if isinstance(obj, list) else "ndarray"
            arr: np.ndarray[Any, Any] = np.asarray(
                obj, dtype=np.float64 if kind == "list" else None
            )
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            if dtype.str not in _DTYPES:
                raise TypeError(
                    f"cache value at {_path_str(path)} is an array of dtype {arr.dtype}; "
                    "bool, integer and float arrays are supported"
                )
            data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            arrays.append([list(path), dtype.str, list(arr.shape), offset, len(data), kind])
            buffers.append(data)
            offset += len(data)
            return None
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Mapping):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise TypeError(f"cache value at {_path_str(path)} has a non-str key {k!r}")
                if is_credential_name(k) and k.lower() not in _VALUE_NAMES_ALLOWED:
                    raise ValueError(
                        f"cache value at {_path_str(path)} has a field named {k!r}, which may "
                        "hold a credential; credentials are never cached"
                    )
                out[k] = walk(v, [*path, k])
            return out
        if isinstance(obj, (list, tuple)):
            return [walk(v, [*path, i]) for i, v in enumerate(obj)]
        raise TypeError(
            f"cache value at {_path_str(path)} has type {type(obj).__name__}; use JSON types "
            "or numpy arrays"
        )

    document = walk(value, [])
    header = json.dumps({"d": document, "a": arrays}, separators=(",", ":")).encode()
    return b"".join([_MAGIC, len(header).to_bytes(_HEADER_LEN, "little"), header, *buffers])


def _decode_value(raw: bytes, key: str) -> dict[str, Any]:
    try:
        end = _header_end(raw)
        return _restore(raw, end, json.loads(raw[8:end]))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise _corrupt(key, exc) from exc


def _decode_many(raws: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """Decode many values with one JSON parse of all their headers (the per-call cost dominates)."""
    try:
        ends = [_header_end(raw) for raw in raws.values()]
        heads = [raw[8:end] for raw, end in zip(raws.values(), ends, strict=True)]
        headers = json.loads(b"[" + b",".join(heads) + b"]")
        if len(headers) != len(raws):
            raise ValueError("header count")
        return {
            key: _restore(raw, end, header)
            for (key, raw), end, header in zip(raws.items(), ends, headers, strict=True)
        }
    except (ValueError, KeyError, IndexError, TypeError):
        # Find the corrupt entry and name it.
        return {key: _decode_value(raw, key) for key, raw in raws.items()}


def _header_end(raw: bytes) -> int:
    if raw[:4] != _MAGIC:
        raise ValueError("not a dect-maas value")
    end = 8 + int.from_bytes(raw[4:8], "little")
    if end > len(raw):
        raise ValueError("truncated header")
    return end


def _restore(raw: bytes, end: int, header: Any) -> dict[str, Any]:
    document = header["d"]
    if not isinstance(document, dict):
        raise ValueError("not a mapping")
    for path, dtype_str, shape, offset, nbytes, kind in header["a"]:
        dtype = _DTYPE_OBJECTS[dtype_str]
        start = end + offset
        if offset < 0 or nbytes < 0 or start + nbytes > len(raw) or nbytes % dtype.itemsize:
            raise ValueError("bad array bounds")
        if nbytes:
            arr = np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize, offset=start)
        else:
            arr = np.empty(0, dtype=dtype)
            arr.flags.writeable = False
        if len(shape) != 1:
            arr = arr.reshape(shape)
        parent: Any = document
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = arr.tolist() if kind == "list" else arr
    return document


def _corrupt(key: str, exc: BaseException) -> CacheError:
    return CacheError(
        f"response cache entry {key[:12]}... is corrupt ({type(exc).__name__}: {exc}); "
        "delete that entry or the cache folder to query it again"
    )


def _path_str(path: Sequence[str | int]) -> str:
    return "value" + "".join(f"[{p!r}]" for p in path)
