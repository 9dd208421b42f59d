"""How the controller reaches its database and holds it: the URL it connects with, what each new connection is
set up with (SQLite's version checked; PostgreSQL's TCP keepalives and timeouts, both ends), the lock that lets one
controller at a time run on a database, and whether a folder is on a network file system (no place for SQLite).

Separate from controller.store, which is what is stored and how it is read and written: these are about the
connection and the process beside it, not about jobs or models.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dreambooth.errors import InputError


class ControllerRunning(RuntimeError):
    """Another controller holds this database."""


def always_held() -> bool:
    return True


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[Callable[[], bool]]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ControllerRunning(f"another controller runs on this database ({path} is locked)") from None
        yield always_held  # the kernel holds it for as long as this process lives


@contextlib.contextmanager
def advisory_lock(engine: Engine) -> Iterator[Callable[[], bool]]:
    with engine.connect() as connection:
        if not connection.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": _CONTROLLER_LOCK}).scalar():
            raise ControllerRunning("another controller runs on this database (its advisory lock is held)")
        connection.commit()  # a session lock outlives the transaction, which must not stay open for days

        def still_held() -> bool:
            """False once the session that holds the lock has ended (the database restarted or failed over, the
            connection was cut): the lock went with it, and a second controller could take it now."""
            try:
                connection.execute(sa.text("SELECT 1"))
                connection.commit()
            except sa.exc.SQLAlchemyError:  # the connection's error, then "rollback first" on later calls
                return False
            return True

        try:
            yield still_held
        finally:  # explicitly: the pool keeps the session (and a session lock) open after the connection's close
            with contextlib.suppress(sa.exc.SQLAlchemyError):  # a session that ended took its lock with it
                connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _CONTROLLER_LOCK})


_CONTROLLER_LOCK = 0x44425F4354524C  # "DB_CTRL": the session advisory lock's key

# How long a PostgreSQL connection's other end may be gone unnoticed. The hold above is a session lock that ends only
# once the server sees its client gone: with the OS's TCP keepalive defaults (2 h idle, then 9 probes 75 s apart) a
# controller host that lost power kept the database from its replacement for 2 h 11 min. And a connection to a server
# that vanished (a failover that left its old address black-holed) blocked whatever used it until the OS gave up
# resending (tcp_retries2: about 15 min).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3  # a quiet connection's far end checked every
# 10 s, given up on after 3 probes 5 s apart unanswered: a dead peer found in about 25 s, by either side
TCP_USER_TIMEOUT_MS = 30_000  # data sent and not acknowledged for 30 s (a query to a black-holed server): given up
CONNECT_TIMEOUT_S = 10  # a new connection to an address nothing answers (libpq: no limit but the OS's, ~2 min)
_SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": KEEPALIVE_IDLE_S,
    "tcp_keepalives_interval": KEEPALIVE_INTERVAL_S,
    "tcp_keepalives_count": KEEPALIVE_COUNT,
}


def libpq_liveness(url: sa.URL) -> dict[str, Any]:
    """The client side's: libpq's TCP keepalives and timeouts, for a libpq driver (psycopg, psycopg2), where the
    URL does not set them itself (?keepalives_idle=... wins)."""
    driver = url.get_driver_name()
    if driver not in ("psycopg", "psycopg2"):
        return {}  # another driver has other names for them, if any
    wanted: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "connect_timeout": CONNECT_TIMEOUT_S,
    }
    try:
        if driver == "psycopg":
            import psycopg

            libpq = psycopg.pq.version()
        else:
            import psycopg2.extensions

            libpq = psycopg2.extensions.libpq_version()
    except ImportError:
        libpq = 0  # create_engine says what is missing
    if libpq >= 120000:  # an older libpq refuses to connect with a parameter it does not know
        wanted["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    return {name: value for name, value in wanted.items() if name not in url.query}


def server_liveness(dbapi_connection: Any, _record: Any) -> None:
    """The server side's, on each new session (the hold's among them): its TCP keepalives to this client, where
    neither the server's configuration, the role or database (ALTER ROLE ... SET), nor the URL's `options` set them.
    Set by SQL, not by the `options` startup parameter, which connection poolers (PgBouncer) refuse. Through a pooler
    they are the server's to the pooler, not to this controller: the hold's end then waits on the pooler's own
    keepalives (deploy/README.md)."""
    wanted = ", ".join(["(%s, %s)"] * len(_SERVER_KEEPALIVES))
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(
            "SELECT set_config(s.name, w.value, false) FROM pg_settings AS s "
            f"JOIN (VALUES {wanted}) AS w (name, value) ON s.name = w.name WHERE s.source = 'default'",
            [item for name, value in _SERVER_KEEPALIVES.items() for item in (name, str(value))],
        )
    finally:
        cursor.close()
    dbapi_connection.commit()


URL_FORMS = (
    "sqlite:///PATH, or postgresql+psycopg://USER@HOST/DATABASE (psycopg: pip install 'dreambooth-cluster[postgres]')"
)


def database_url(url: str) -> sa.URL:
    """The URL to connect with: postgres:// (Heroku's and many a DATABASE_URL's spelling, which SQLAlchemy does
    not know) and postgresql:// (whose default driver differs between SQLAlchemy versions) name psycopg, the driver
    the `postgres` extra installs. InputError("database_url") for what is no URL."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise InputError("database_url", f"not a database URL; use {URL_FORMS}") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


SQLITE_MIN = (3, 35, 0)  # RETURNING, which every write here uses


def check_sqlite(dbapi: Any) -> None:
    """An older SQLite takes every write for a syntax error: the controller started, and every submission was then
    answered "unavailable; retry". Refused at start instead, as the setting to change."""
    found = getattr(dbapi, "sqlite_version_info", None)
    if found is not None and tuple(found) < SQLITE_MIN:
        have, need = (".".join(map(str, version)) for version in (found, SQLITE_MIN))
        raise InputError(
            "database_url",
            f"this Python's SQLite is {have}; the controller needs {need} or later: run it with a Python built with "
            f"a newer SQLite (the project's image has one), or use PostgreSQL (postgresql+psycopg://USER@HOST/DATABASE)",
        )


_NETWORK_FILESYSTEMS = ("nfs", "cifs", "smb", "ceph", "lustre", "gluster", "beegfs", "gpfs", "9p", "fuse.")


def is_network_filesystem(kind: str) -> bool:
    """NFS (AWS EFS, GCP Filestore), SMB (Azure Files), CephFS, Lustre, and FUSE mounts of object stores."""
    return kind.startswith(_NETWORK_FILESYSTEMS)


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path` (the longest mount point above it in /proc/self/mounts, or in
    `mounts`, text in that format); None where that table cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best_point, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # the table escapes spaces
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best_point):
            best_point, kind = point, fields[2]
    return kind
