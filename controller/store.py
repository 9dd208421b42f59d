"""The controller's durable state: jobs and models in SQLite (default, a file) or PostgreSQL, via SQLAlchemy Core.

Every method is one short transaction on its own pooled connection, so the Store is thread-safe and the state
survives `kill -9` of the controller at any point: a mutation is either committed whole or not at all. Writes
are single conditional statements (UPDATE ... WHERE ... RETURNING) rather than read-modify-write, which keeps
them atomic on both backends without explicit locking. Times are epoch seconds (floats), the same everywhere.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from controller.database import (
    URL_FORMS,
    advisory_lock,
    always_held,
    check_sqlite,
    database_url,
    file_lock,
    filesystem_type,
    is_network_filesystem,
    libpq_liveness,
    server_liveness,
)
from dreambooth.errors import InputError

log = logging.getLogger(__name__)

STATES = ("QUEUED", "PREPARING", "TRAINING", "EXPORTING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED")
RUNNING_STATES = frozenset({"PREPARING", "TRAINING", "EXPORTING"})  # the trainer reports these
ACTIVE_STATES = RUNNING_STATES | {"CANCELLING"}  # holding cluster resources
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
UNFINISHED_STATES = frozenset(STATES) - TERMINAL_STATES


class TenantFull(Exception):
    """insert_job's `max_unfinished` reached; `unfinished` is how many the tenant has."""

    def __init__(self, unfinished: int):
        super().__init__(f"{unfinished} unfinished jobs")
        self.unfinished = unfinished


class SchemaMismatch(RuntimeError):
    """The database was written by a later version of the controller, whose tables this one does not know."""


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


# What PostgreSQL's text cannot hold (NUL; it refuses the whole statement) and what no UTF-8 can (a lone surrogate,
# as Python decodes an undecodable file name or JSON's "\udce9"; both backends refuse it).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class CleanText(sa.TypeDecorator):
    """Free text from outside the controller (a trainer's event, the tail of Ray's log): stored with each character
    a database would refuse replaced by U+FFFD (the Unicode replacement character) and, in a column with a length,
    cut to that length (PostgreSQL refuses longer; SQLite would keep it). A refused write failed on every reconcile
    pass, and the job it was for stayed where it was for good."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value is None:
            return None
        value = _UNSTORABLE.sub("\ufffd", value)
        length = self.impl.length
        return value if length is None else value[:length]


class CleanString(CleanText):
    """CleanText in a VARCHAR(length)."""

    impl = sa.String
    cache_ok = True


class JSONText(sa.TypeDecorator):
    """A dict stored as JSON text: portable, and readable with the sqlite3 shell."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


meta = sa.MetaData()
Time = sa.Double  # epoch seconds; DOUBLE PRECISION round-trips a float exactly, which keyset tokens rely on

jobs = sa.Table(
    "jobs",
    meta,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("spec", JSONText, nullable=False),
    sa.Column("progress", JSONText, nullable=False),
    sa.Column("failure_reason", CleanString(64)),
    sa.Column("failure_message", CleanText),
    sa.Column("model_id", sa.String(64)),
    sa.Column("last_checkpoint_step", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("ray_submission_id", sa.String(128)),
    sa.Column("events_offset", sa.BigInteger, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("start_time", Time),
    sa.Column("end_time", Time),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # NULLs are distinct in a UNIQUE constraint on both backends: jobs without a request_id never collide.
    sa.UniqueConstraint("tenant", "request_id", name="uq_jobs_tenant_request"),
)
sa.Index("ix_jobs_list", jobs.c.tenant, jobs.c.create_time.desc(), jobs.c.job_id.desc())
sa.Index("ix_jobs_sched", jobs.c.state, jobs.c.priority.desc(), jobs.c.create_time, jobs.c.job_id)
# Per-tenant quota counts stay O(unfinished jobs); a list filtered by state reads a range per state.
sa.Index("ix_jobs_list_by_state", jobs.c.tenant, jobs.c.state, jobs.c.create_time.desc(), jobs.c.job_id.desc())

models = sa.Table(
    "models",
    meta,
    sa.Column("model_id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=False),  # no foreign key: deleting a job keeps its model
    sa.Column("path", CleanText, nullable=False),
    sa.Column("metadata", JSONText, nullable=False),
    sa.Column("deployed", sa.Boolean, nullable=False),
    sa.Column("endpoint", CleanText, nullable=False),
    sa.Column("create_time", Time, nullable=False),
)
sa.Index("ix_models_list", models.c.tenant, models.c.create_time.desc(), models.c.model_id.desc())

# The tables' shape above, stamped in the counters table. A change to them bumps it, and create_all then upgrades a
# database with a lower stamp before anything else touches it. A controller never runs on a higher stamp: it would
# write rows a later version's invariants do not expect (an operator rolling back after an upgrade).
SCHEMA_VERSION = 1

# One row holding the last job's seq (jobs in the order they were inserted). Bumping it is how a submission takes the
# submissions' lock (PostgreSQL: its row lock; SQLite: the write lock), to count a tenant's jobs against its limit.
counters = sa.Table(
    "counters", meta, sa.Column("name", sa.String(32), primary_key=True), sa.Column("value", sa.BigInteger)
)


@dataclass
class JobRecord:
    tenant: str
    spec: dict[str, Any]
    job_id: str = field(default_factory=new_job_id)
    request_id: str | None = None
    state: str = "QUEUED"
    priority: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    failure_reason: str | None = None
    failure_message: str | None = None
    model_id: str | None = None
    last_checkpoint_step: int = 0
    attempts: int = 0
    ray_submission_id: str | None = None
    events_offset: int = 0
    create_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    update_time: float = 0.0
    seq: int = 0  # the order of insertion (insert_job sets it)


@dataclass
class ModelRecord:
    model_id: str
    tenant: str
    job_id: str
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)
    deployed: bool = False
    # Where it is served: the controller fills it in from its serving config when it answers (older versions stored
    # it at the deploy; the column stays for their databases, unread).
    endpoint: str = ""
    create_time: float = field(default_factory=time.time)


_JOB_FIELDS = {f.name for f in dataclasses.fields(JobRecord)} - {"job_id", "seq"}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelRecord)} - {"model_id"}


class Store:
    def __init__(self, url: str, busy_timeout_ms: int = 30_000, create: bool = True):
        """`create`: make the tables a database lacks now (create_all); a controller does so once it holds the
        database, so that no other controller still writes to tables it upgrades."""
        parsed = database_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        postgres = parsed.get_backend_name() == "postgresql"
        connect_args = {"check_same_thread": False} if sqlite else libpq_liveness(parsed) if postgres else {}
        try:
            # pool_pre_ping: after a PostgreSQL restart, a pooled connection is found dead and replaced, not used.
            self.engine: Engine = sa.create_engine(parsed, connect_args=connect_args, pool_pre_ping=not sqlite)
        except (sa.exc.NoSuchModuleError, ImportError) as e:  # no such dialect, or its driver is not installed
            raise InputError("database_url", f"{parsed.drivername}: {e}; use {URL_FORMS}") from None
        if sqlite:
            check_sqlite(self.engine.dialect.dbapi)
        if postgres:
            sa.event.listen(self.engine, "connect", server_liveness)
        # SQLite has one writer at a time, and a writer that finds the lock taken polls for it in sleeps of up
        # to 100 ms (its busy handler) while holding a pooled connection: under concurrent submissions, writers
        # starve each other and readers wait for connections. This process's writers queue here instead (no
        # connection held, woken at once); busy_timeout still covers other processes on the same file.
        self._write_lock: Any = threading.Lock() if sqlite else contextlib.nullcontext()
        if sqlite:

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                # WAL: readers never block the writer nor each other; busy_timeout: a writer waits for the
                # lock instead of failing at once; synchronous FULL: a commit survives a power loss too (a
                # build's default may be NORMAL, which can lose the last commits, acknowledged submissions).
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                cursor.close()

            database = self.engine.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
                kind = filesystem_type(Path(database).parent)
                if kind is not None and is_network_filesystem(kind):
                    log.warning(
                        "the SQLite database %s is on a network file system (%s): SQLite's locking and WAL need a "
                        "local disk (corruption, lost commits); set database_url to a local path or PostgreSQL",
                        database,
                        kind,
                    )

        if create:
            self.create_all()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction (on SQLite, one of this process's at a time)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def create_all(self) -> None:
        """Creates the tables and indexes a database lacks, once its schema version is known to be this code's
        or older (a database from before the version was stamped is version 1)."""
        if sa.inspect(self.engine).has_table(counters.name):
            with self.engine.connect() as conn:
                found = conn.execute(sa.select(counters.c.value).where(counters.c.name == "schema_version")).scalar()
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaMismatch(
                    f"the database {self.engine.url} has schema version {found}, newer than this controller's "
                    f"{SCHEMA_VERSION}: a later dreambooth-cluster wrote it. Run that version, or restore the backup "
                    f"taken before the upgrade (a database is not downgraded)"
                )
        meta.create_all(self.engine)
        # create_all skips the tables that exist, with their indexes: a database from an older version gets the
        # indexes added since.
        for table in meta.sorted_tables:
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)
        seeds = (("seq", 0), ("schema_version", SCHEMA_VERSION), ("database_id", secrets.randbits(62)))
        for name, value in seeds:
            try:
                with self.engine.begin() as conn:
                    if conn.execute(sa.select(counters.c.value).where(counters.c.name == name)).first() is None:
                        conn.execute(counters.insert().values(name=name, value=value))
            except sa.exc.IntegrityError:
                pass  # another process seeded it first
        # An older version's database, upgraded above, is this version's now: stamped so, or a rollback to that older
        # version would not be refused.
        with self.engine.begin() as conn:
            stamp = counters.c.name == "schema_version"
            conn.execute(counters.update().where(stamp, counters.c.value < SCHEMA_VERSION).values(value=SCHEMA_VERSION))

    def close(self) -> None:
        self.engine.dispose()

    def hold_for_one_controller(self) -> contextlib.AbstractContextManager:
        """Held while a controller runs on this database; a second one is refused (ControllerRunning): two would
        start jobs past the tenants' limits and the capacity, resubmit each other's attempts, and each tell only
        its own watchers. SQLite: a lock on a file beside the database (the kernel lets go when the process dies);
        PostgreSQL: a session advisory lock on a connection held meanwhile. Gives a function that says whether
        the hold still stands (PostgreSQL's ends with its session: a restart or failover of the database)."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite":
            if not url.database or url.database == ":memory:":
                return contextlib.nullcontext(always_held)
            return file_lock(Path(f"{url.database}.controller-lock"))
        return advisory_lock(self.engine)

    def database_id(self) -> int:
        """This database's own random number, drawn when its tables were made (or, for a database from before it,
        by the first controller to run on it since). Submissions' folders are marked with it (controller.orphans)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(counters.c.value).where(counters.c.name == "database_id")).scalar_one()

    # --- jobs -------------------------------------------------------------------------------------------

    def insert_job(self, record: JobRecord, max_unfinished: int | None = None) -> JobRecord:
        """Insert a job; if its (tenant, request_id) exists already, return that job instead (idempotent).

        With `max_unfinished`, TenantFull if the tenant has that many jobs not ended: counted in the insert's own
        transaction once it holds the writers' lock (SQLite: this process's; PostgreSQL: the seq counter's row),
        so concurrent submissions cannot all slip under the limit."""
        row = dataclasses.asdict(record)
        row["request_id"] = row["request_id"] or None  # proto3's "" means no idempotency key
        _check_state(row["state"])
        try:
            with self._writing() as conn:
                row["seq"] = _bump_seq(conn)  # first: it takes the lock
                if row["request_id"] is not None:
                    existing = conn.execute(_by_request_id(record.tenant, row["request_id"])).first()
                    if existing is not None:  # a retry: the first job, whether or not the tenant is full now
                        conn.rollback()
                        return _job(existing)
                if max_unfinished is not None:
                    count = conn.execute(_count_in(record.tenant, UNFINISHED_STATES)).scalar_one()
                    if count >= max_unfinished:
                        raise TenantFull(count)
                row["update_time"] = row["update_time"] or row["create_time"]
                return _job(conn.execute(jobs.insert().values(**row).returning(*jobs.c)).one())
        except sa.exc.IntegrityError:
            # Lost the race to a concurrent submit with the same key (or this is a retry): theirs wins.
            existing = self.find_by_request_id(record.tenant, row["request_id"]) if row["request_id"] else None
            if existing is None:
                raise  # not the idempotency key: a job_id collision, say
            return existing

    def find_by_request_id(self, tenant: str, request_id: str) -> JobRecord | None:
        if not _storable(request_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_by_request_id(tenant, request_id)).first()
        return None if row is None else _job(row)

    def job_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(jobs.c.job_id)).scalars())

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        if not _storable(job_id):
            return None
        query = sa.select(jobs).where(jobs.c.job_id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _job(row)

    def list_jobs(
        self, tenant: str, page_size: int, page_token: str = "", states: Collection[str] | None = None
    ) -> tuple[list[JobRecord], str]:
        """Newest first. Keyset pagination on (create_time, job_id): one range scan of ix_jobs_list at any
        depth, and stable while jobs are added or removed (each job appears at most once). Filtered by state,
        one range scan of ix_jobs_list_by_state per state, in one statement, merged: a state that few of a tenant's
        jobs are in is found without reading the others (a filter on ix_jobs_list would read the tenant's whole
        history)."""
        query = sa.select(jobs).where(jobs.c.tenant == tenant)
        queries = [query.where(jobs.c.state == state) for state in sorted(set(states))] if states else [query]
        # A token carries its filter: one reused with another would page from the middle of a different list.
        kind = "j" + "".join(f",{state}" for state in sorted(set(states or ())))
        rows, token = self._page(queries, jobs.c.create_time, jobs.c.job_id, page_size, page_token, kind)
        return [_job(r) for r in rows], token

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Set some fields of a job (KeyError if there is no such job)."""
        record = self._update(job_id, None, fields)
        if record is None:
            raise KeyError(job_id)
        return record

    def transition(self, job_id: str, from_states: set[str], to_state: str, **fields: Any) -> JobRecord | None:
        """Compare-and-set on state: None (and nothing written) unless the job is in one of from_states, so of
        two racing transitions out of the same state (cancel vs. completion) exactly one wins."""
        return self._update(job_id, set(from_states), {**fields, "state": to_state})

    def delete_job(self, job_id: str) -> bool:
        with self._writing() as conn:
            return conn.execute(jobs.delete().where(jobs.c.job_id == job_id)).rowcount > 0

    def queued_jobs(self, specs: dict[str, dict[str, Any]] | None = None) -> list[JobRecord]:
        """The queue, in order. `specs` (job id -> spec), kept by the caller between calls, saves reading the specs
        again: a job's spec never changes, a scheduling pass reads the whole queue, and a spec can be ~100 KB of
        prompts (a tenant's 1000 queued jobs decoded ~0.8 GB of JSON per pass). Filled with the queue's new jobs,
        and emptied of the jobs that left it."""
        order = (jobs.c.priority.desc(), jobs.c.create_time, jobs.c.job_id)
        if specs is None:
            return self._jobs(sa.select(jobs).where(jobs.c.state == "QUEUED").order_by(*order))
        columns = [column for column in jobs.c if column.name != "spec"]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*columns).where(jobs.c.state == "QUEUED").order_by(*order)).all()
            queued = {row.job_id for row in rows}
            for gone in specs.keys() - queued:
                del specs[gone]
            new = sorted(queued - specs.keys())
            for start in range(0, len(new), 500):  # bound the IN list
                chunk = new[start : start + 500]
                specs.update(conn.execute(sa.select(jobs.c.job_id, jobs.c.spec).where(jobs.c.job_id.in_(chunk))).all())
        return [JobRecord(**row._mapping, spec=specs[row.job_id]) for row in rows if row.job_id in specs]

    def ended_since(self, since: float) -> list[tuple[str, str, int]]:
        """(job id, state, attempts) of the jobs that ended after `since`."""
        query = sa.select(jobs.c.job_id, jobs.c.state, jobs.c.attempts).where(
            jobs.c.state.in_(TERMINAL_STATES), jobs.c.end_time > since
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def active_jobs(self) -> list[JobRecord]:
        query = sa.select(jobs).where(jobs.c.state.in_(sorted(ACTIVE_STATES)))
        return self._jobs(query.order_by(jobs.c.create_time, jobs.c.job_id))

    def count_jobs_by_state(self, states: frozenset[str] = frozenset(STATES)) -> dict[str, int]:
        """The jobs in each of `states`, zeros included (a metrics gauge must drop to 0, not vanish). Counting
        the unfinished states reads only their jobs (ix_jobs_sched); the finished ones grow with all history."""
        query = sa.select(jobs.c.state, sa.func.count()).where(jobs.c.state.in_(sorted(states))).group_by(jobs.c.state)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {state: 0 for state in states} | {state: n for state, n in rows}

    def queued_by_tenant(self) -> dict[str, int]:
        """How many jobs each tenant has queued (a tenant with none: absent)."""
        query = sa.select(jobs.c.tenant, sa.func.count()).where(jobs.c.state == "QUEUED").group_by(jobs.c.tenant)
        with self.engine.connect() as conn:
            return {tenant: n for tenant, n in conn.execute(query).all()}

    def count_tenant_jobs(self, tenant: str, states: frozenset[str]) -> int:
        """How many of the tenant's jobs are in `states`."""
        with self.engine.connect() as conn:
            return conn.execute(_count_in(tenant, states)).scalar_one()

    # --- models -----------------------------------------------------------------------------------------

    def insert_model(self, record: ModelRecord) -> ModelRecord:
        with self._writing() as conn:
            row = conn.execute(models.insert().values(**dataclasses.asdict(record)).returning(*models.c)).one()
        return ModelRecord(**row._mapping)

    def get_model(self, model_id: str, tenant: str | None = None) -> ModelRecord | None:
        if not _storable(model_id):
            return None
        query = sa.select(models).where(models.c.model_id == model_id)
        if tenant is not None:
            query = query.where(models.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else ModelRecord(**row._mapping)

    def list_models(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[ModelRecord], str]:
        query = sa.select(models).where(models.c.tenant == tenant)
        rows, token = self._page([query], models.c.create_time, models.c.model_id, page_size, page_token, "m")
        return [ModelRecord(**r._mapping) for r in rows], token

    def deployed_models(self) -> list[ModelRecord]:
        """Every tenant's models marked for serving."""
        query = sa.select(models).where(models.c.deployed.is_(True)).order_by(models.c.model_id)
        with self.engine.connect() as conn:
            return [ModelRecord(**r._mapping) for r in conn.execute(query)]

    def update_model(self, model_id: str, **fields: Any) -> ModelRecord:
        _check_fields(fields, _MODEL_FIELDS)
        with self._writing() as conn:
            stmt = models.update().where(models.c.model_id == model_id).values(**fields).returning(*models.c)
            row = conn.execute(stmt).first()
        if row is None:
            raise KeyError(model_id)
        return ModelRecord(**row._mapping)

    def delete_model(self, model_id: str) -> bool:
        """Deletes the model's row unless it is deployed: False, and nothing deleted, when it is (or is gone)."""
        with self._writing() as conn:
            stmt = models.delete().where(models.c.model_id == model_id, models.c.deployed.is_(False))
            return conn.execute(stmt).rowcount > 0

    # --- internals --------------------------------------------------------------------------------------

    def _update(self, job_id: str, from_states: set[str] | None, fields: dict[str, Any]) -> JobRecord | None:
        _check_fields(fields, _JOB_FIELDS)
        if "state" in fields:
            _check_state(fields["state"])
        stmt = jobs.update().where(jobs.c.job_id == job_id)
        if from_states is not None:
            stmt = stmt.where(jobs.c.state.in_(sorted(from_states)))
        # No lock beyond the job's row: a job's writes serialize on it (the compare-and-set included), and writes to
        # other jobs need not wait.
        with self._writing() as conn:
            row = conn.execute(stmt.values(**fields, update_time=time.time()).returning(*jobs.c)).first()
        return None if row is None else _job(row)

    def _jobs(self, query: sa.Select) -> list[JobRecord]:
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query)]

    def _page(
        self, queries: list[sa.Select], time_col: Any, id_col: Any, page_size: int, token: str, kind: str
    ) -> tuple[list[sa.Row], str]:
        """A page of the rows `queries` select together (each read in index order, all in one statement)."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if token:
            after_time, after_id = _decode_token(token, kind)
            # A row-value comparison, which both SQLite and PostgreSQL turn into an index range bound.
            queries = [query.where(sa.tuple_(time_col, id_col) < sa.tuple_(after_time, after_id)) for query in queries]
        ordered = [query.order_by(time_col.desc(), id_col.desc()).limit(page_size + 1) for query in queries]
        # One statement, so one snapshot (SQLite and PostgreSQL's READ COMMITTED take one per statement): read one
        # after another, a job that moved from the state read last to one read before was in neither read.
        statement = ordered[0] if len(ordered) == 1 else sa.union_all(*(sa.select(q.subquery()) for q in ordered))
        with self.engine.connect() as conn:
            rows = list(conn.execute(statement))

        def key(row: sa.Row) -> tuple:
            return row._mapping[time_col.name], row._mapping[id_col.name]

        if len(queries) > 1:
            rows = sorted(rows, key=key, reverse=True)[: page_size + 1]
        if len(rows) <= page_size:  # the extra row tells whether there is a next page, without a COUNT
            return rows, ""
        return rows[:page_size], _encode_token(kind, *key(rows[page_size - 1]))


def _by_request_id(tenant: str, request_id: str) -> sa.Select:
    return sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.request_id == request_id)


def _count_in(tenant: str, states: frozenset[str]) -> sa.Select:
    return sa.select(sa.func.count()).where(jobs.c.tenant == tenant, jobs.c.state.in_(sorted(states)))


def _bump_seq(conn: Connection) -> int:
    stmt = counters.update().where(counters.c.name == "seq").values(value=counters.c.value + 1)
    return conn.execute(stmt.returning(counters.c.value)).scalar_one()


def _job(row: sa.Row) -> JobRecord:
    return JobRecord(**row._mapping)


def _check_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"cannot update field(s) {unknown}")


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}; one of {STATES}")


def _encode_token(kind: str, create_time: float, key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([kind, create_time, key]).encode()).decode().rstrip("=")


def _storable(text: str) -> bool:
    """Whether a key could be stored: PostgreSQL's text holds no NUL character (asking for one fails there, where
    SQLite would answer "none"), so nothing stored has one, and a lookup of one finds nothing on both."""
    return "\x00" not in text


def _decode_token(token: str, kind: str) -> tuple[float, str]:
    try:
        got_kind, create_time, key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if got_kind != kind or not isinstance(create_time, (int, float)) or not isinstance(key, str):
            raise ValueError
        if not _storable(key):
            raise ValueError
        create_time = float(create_time)  # OverflowError for an int beyond a float's range
    # binascii.Error and JSONDecodeError are ValueErrors; RecursionError: JSON nested too deep
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid page token {token[:40]!r}") from e
    return create_time, key
