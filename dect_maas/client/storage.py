"""The storage seam: where the ledger and the response cache keep their data.

Two backends serve both stores with the same semantics (one shared test suite runs against each):

- the embedded default, a folder on this machine: the ledger in one SQLite file, the cache in a
  diskcache folder (``ledger.py``, ``cache.py``);
- a PostgreSQL database (``pg.py``, through psycopg 3 and psycopg_pool), chosen by giving a
  ``postgresql://`` URL wherever a folder is asked for: ``Client(ledger=...)``,
  ``CacheConfig(directory=...)``, ``ledger_dir``/``cache_dir`` in a config, ``--ledger-dir`` on
  the command line. Several machines then share one budget and one cache.

A database URL never carries a password: ``postgresql://user:secret@host/db`` and
``?password=...`` are refused like an inline API key. The password comes from libpq's own
sources (``PGPASSWORD``, ``~/.pgpass``, a client certificate) or from an environment variable
named in the URL: ``postgresql://dm@db.example/team?password_env=DM_PG_PASSWORD``. A second
parameter of ours, ``schema`` (default ``dect_maas``), names the PostgreSQL schema that holds the
tables, so one database can hold several independent ledgers. Every other query parameter goes to
libpq as it is (``host=/run/postgresql``, ``sslmode=require``, ``connect_timeout=5``, ...).

The ledger sees its store through ``LedgerStore``: short transactions over SQL written once, with
``?`` placeholders (the PostgreSQL store rewrites them). The cache sees ``CacheStore``: raw bytes
by key, nothing else. Each store creates and versions its own schema and refuses a newer one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from dect_maas._exceptions import ConfigError
from dect_maas._secrets import is_credential_name

__all__ = [
    "DEFAULT_SCHEMA",
    "CacheStore",
    "DatabaseUrl",
    "LedgerStore",
    "SqlConnection",
    "SqlCursor",
    "is_database_url",
    "parse_database_url",
]

DATABASE_SCHEMES = ("postgresql", "postgres")
DEFAULT_SCHEMA = "dect_maas"
POSTGRES_INSTALL_HINT = (
    "a postgresql:// ledger or cache needs psycopg 3: pip install 'dect-maas[postgres]'"
)
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_OUR_PARAMS = ("password_env", "schema")


class SqlCursor(Protocol):
    """What the ledger reads back from a statement (sqlite3's and psycopg's cursors both fit)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """A connection inside an open transaction; statements use ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> SqlCursor: ...


class LedgerStore(Protocol):
    """Where a ``Ledger`` keeps its tables.

    ``transaction(write=True)`` serialises writers across threads, processes and machines (a
    reservation checks the totals and inserts in one step); ``write=False`` is one consistent
    read snapshot. Storage faults leave as ``LedgerError`` naming ``location``.
    """

    location: str
    """The file path, or the database URL as it may be shown (never with a password)."""

    def prepare(self) -> None:
        """Create the schema if absent, migrate an older one, refuse a newer one."""

    def transaction(
        self, write: bool = True, durable: bool = True
    ) -> AbstractContextManager[SqlConnection]:
        """``durable=False`` allows the commit to reach the disk later, in log order (see
        ``Ledger._transaction`` for why that never undercounts)."""

    def close(self) -> None: ...


class CacheStore(Protocol):
    """Where a ``ResponseCache`` keeps its encoded values: bytes by 64-hex key, never evicted."""

    location: str

    def stamp(self, value: bytes) -> bytes | None:
        """Write ``value`` as the schema stamp of a new, empty store; return the stamp found."""

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store all of ``items`` in one transaction, or none (replacing older values)."""

    def claim(
        self, keys: list[str], owner: Any, take_over: bool = False
    ) -> tuple[dict[str, bytes], list[str]]:
        """Stored values of ``keys``, claims for ``owner`` on the missing ones nobody live
        holds, and the keys held by another live process (``ResponseCache.claim_many``)."""

    def release_claims(self, owner: Any) -> None: ...

    def contains(self, key: str) -> bool: ...

    def count(self) -> int:
        """Entries, not counting the schema stamp."""

    def keys(self) -> Iterator[str]:
        """Every key (for copying a store), not counting the schema stamp."""

    def close(self) -> None: ...


def is_database_url(target: object) -> bool:
    """True when ``target`` is a ``postgresql://`` (or ``postgres://``) URL string."""
    return isinstance(target, str) and target.split("://", 1)[0].lower() in DATABASE_SCHEMES


@dataclass(frozen=True)
class DatabaseUrl:
    """A checked database URL: what libpq gets, what may be shown, and our own parameters."""

    conninfo: str
    display: str
    schema: str
    password_env: str | None

    def __repr__(self) -> str:
        return f"DatabaseUrl({self.display!r})"


def parse_database_url(url: str, what: str = "database URL") -> DatabaseUrl:
    """Check ``url`` and split off our parameters, or raise one ``ConfigError`` line.

    The message never quotes a password: a URL that holds one is shown masked.
    """
    if not is_database_url(url):
        raise ConfigError(f"{what} must be a postgresql:// URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL (check the host and port)") from None
    if parts.password:
        raise ConfigError(
            f"{what} {_mask(url)} carries a password; inline credentials are refused: put the "
            "password in an environment variable and name it with ?password_env=NAME "
            "(or use PGPASSWORD or ~/.pgpass)"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [k.lower().replace("-", "_") for k, _ in query]
    if any(is_credential_name(n) or n == "passfile" for n in names):
        raise ConfigError(
            f"{what} {_mask(url)} carries a credential in its query string; inline credentials "
            "are refused: name an environment variable with ?password_env=NAME instead"
        )
    ours = {k: v for k, v in query if k in _OUR_PARAMS}
    schema = ours.get("schema", DEFAULT_SCHEMA)
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            f"{what}: schema must be 1-63 lower-case letters, digits or _ (not starting with a "
            f"digit), got {schema!r}"
        )
    password_env = ours.get("password_env") or None
    if password_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
        raise ConfigError(f"{what}: password_env must name an environment variable")
    rest = [(k, v) for k, v in query if k not in _OUR_PARAMS]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username
    if user is not None:
        netloc = f"{quote(user, safe='')}@{netloc}"
    conninfo = urlunsplit(
        ("postgresql", netloc, parts.path, "&".join(f"{k}={quote(v)}" for k, v in rest), "")
    )
    # Shown as given: a password (in the user info or the query) was refused above.
    display = urlunsplit(("postgresql", netloc, parts.path, parts.query, ""))
    return DatabaseUrl(conninfo, display, schema, password_env)


def _mask(url: str) -> str:
    from dect_maas._urls import mask_url

    return mask_url(url)


def display_target(target: object) -> str:
    """A folder or database URL as it may be shown in messages (a URL never with a secret)."""
    if is_database_url(target):
        try:
            return parse_database_url(str(target)).display
        except ConfigError:
            return _mask(str(target))
    return str(target)


def connect_kwargs(url: DatabaseUrl, environ: Mapping[str, str]) -> dict[str, Any]:
    """Connection keywords beside the conninfo: the password from ``password_env``."""
    kwargs: dict[str, Any] = {"options": f"-c search_path={url.schema}"}
    if url.password_env is not None:
        secret = environ.get(url.password_env)
        if not secret:
            raise ConfigError(
                f"the environment variable {url.password_env} (password_env of "
                f"{url.display}) is not set"
            )
        kwargs["password"] = secret
    return kwargs
