"""controller.store, and controller.database that it connects through, on real databases: SQLite files in tmp_path
(and PostgreSQL where a server and a driver are installed; those tests are skipped otherwise). No mocks."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller.database import ControllerRunning, filesystem_type, is_network_filesystem
from controller.store import (
    ACTIVE_STATES,
    SCHEMA_VERSION,
    STATES,
    UNFINISHED_STATES,
    JobRecord,
    ModelRecord,
    SchemaMismatch,
    Store,
    TenantFull,
    counters,
    jobs,
)
from dreambooth.errors import InputError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


# --- backends ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 (its own data dir, trust auth), or a skip when there is no server
    binary or no psycopg driver here."""
    pytest.importorskip("psycopg")
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    initdb = shutil.which("initdb") or next((str(d / "initdb") for d in bindirs if (d / "initdb").exists()), None)
    if initdb is None:
        pytest.skip("no PostgreSQL server binaries")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    prefix: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="store-pg-")) / "data"
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user when there is one
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user")
        prefix = ["runuser", "-u", "postgres", "--"]
        os.chmod(data.parent, 0o755)
        data.mkdir()
        os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    # -l: the server must not inherit our pipes, or capturing pg_ctl's output would wait for the server to end.
    init = [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"]
    start = [*prefix, pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-o", opts, "-w", "start"]
    try:
        subprocess.run(init, check=True, capture_output=True, timeout=120)
        subprocess.run(start, check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)


_db_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.db'}"
    server = request.getfixturevalue("postgres_server")
    name = f"t{os.getpid()}_{next(_db_names)}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return f"{server}/{name}"


@pytest.fixture
def store(url):
    store = Store(url)
    yield store
    store.close()


def job(tenant: str = "acme", **fields) -> JobRecord:
    return JobRecord(tenant=tenant, spec={"base_model": "/m", "instance_prompt": "a sks dog"}, **fields)


# --- jobs -------------------------------------------------------------------------------------------------


def test_insert_get_roundtrip(store):
    record = job(priority=3, progress={"step": 0, "total_steps": 400}, request_id="r1", create_time=1.5e9 + 0.123456)
    stored = store.insert_job(record)
    assert stored.seq == 1 and stored.update_time == record.create_time
    assert store.get_job(record.job_id) == stored
    assert stored.job_id.startswith("job-") and len(stored.job_id) == 16
    assert dataclasses.replace(stored, seq=0, update_time=0.0) == record
    assert store.get_job("job-nope") is None


@pytest.mark.parametrize(("before", "after"), [("EXPORTING", "SUCCEEDED"), ("QUEUED", "PREPARING")])
def test_a_job_that_moves_between_the_listed_states_during_a_listing_is_listed_once(store, before, after):
    """A listing by several states read each state with a statement of its own, in the states' order, and the
    reconciler may move a job between two reads: from the state read first to the one read next (EXPORTING, then
    SUCCEEDED) it was listed twice in one page; from the state read last to the one read first (QUEUED, read after
    PREPARING), not at all. The job is listed once, as the listing's one statement read it."""
    moving = store.insert_job(job(state=before))
    reads = 0

    def after_the_first_read(*_) -> None:
        nonlocal reads
        reads += 1
        if reads == 1:
            store.transition(moving.job_id, {before}, after)

    sa.event.listen(store.engine, "after_execute", after_the_first_read)
    try:
        listed, _ = store.list_jobs("acme", 10, states=[before, after])
    finally:
        sa.event.remove(store.engine, "after_execute", after_the_first_read)
    assert [(j.job_id, j.state) for j in listed] == [(moving.job_id, before)]


def test_idempotent_insert(store):
    first = store.insert_job(job(request_id="r1"))
    again = store.insert_job(job(request_id="r1", priority=9))
    assert again == first == store.find_by_request_id("acme", "r1")
    assert store.find_by_request_id("globex", "r1") is None
    assert store.insert_job(job("other", request_id="r1")).job_id != first.job_id  # keys are per tenant
    # No key (None, or proto3's empty string) never deduplicates.
    assert len({store.insert_job(job(request_id=r)).job_id for r in (None, None, "", "")}) == 4
    assert store.count_jobs_by_state()["QUEUED"] == 6


def test_idempotent_insert_race(store):
    """Threads submitting the same request_id at once all get the one job that won the unique constraint."""
    threads = 8
    for round_ in range(10):
        barrier = threading.Barrier(threads)
        results: list[str] = []

        def submit(round_=round_, barrier=barrier, results=results):
            barrier.wait()
            results.append(store.insert_job(job(request_id=f"race-{round_}")).job_id)

        workers = [threading.Thread(target=submit) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(results) == threads and len(set(results)) == 1
    assert sum(store.count_jobs_by_state().values()) == 10


def test_a_tenants_limit_holds_under_concurrent_inserts(store):
    """The unfinished-jobs limit is counted in the insert's own transaction: threads submitting at once cannot
    all see room (count-then-insert let each of them in)."""
    threads, limit = 8, 3
    store.insert_job(job(state="SUCCEEDED"))  # ended jobs do not count
    barrier = threading.Barrier(threads)
    accepted, full = [], []

    def submit(index: int) -> None:
        barrier.wait()
        try:
            accepted.append(store.insert_job(job(request_id=f"r{index}"), max_unfinished=limit).job_id)
        except TenantFull as e:
            full.append(e.unfinished)

    workers = [threading.Thread(target=submit, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(accepted) == limit and full == [limit] * (threads - limit)
    # At the limit, a retry of an accepted submission still gets its job (idempotency comes first).
    retried = store.get_job(accepted[0])
    assert store.insert_job(job(request_id=retried.request_id), max_unfinished=limit) == retried


def test_tenant_scoping(store):
    mine, theirs = store.insert_job(job("acme")), store.insert_job(job("globex"))
    assert store.get_job(mine.job_id, tenant="acme") == mine
    assert store.get_job(theirs.job_id, tenant="acme") is None
    assert store.get_job(theirs.job_id) == theirs  # the controller's own, unscoped view
    assert [j.job_id for j in store.list_jobs("acme", 10)[0]] == [mine.job_id]
    store.transition(theirs.job_id, {"QUEUED"}, "TRAINING")
    assert store.count_tenant_jobs("acme", ACTIVE_STATES) == 0 and store.count_tenant_jobs("globex", ACTIVE_STATES) == 1


def test_keyset_pagination_with_state_filter(store):
    # Three jobs per timestamp: ties on create_time are broken by job_id, and must not drop or repeat a job.
    records = []
    for i in range(300):
        state = STATES[i % len(STATES)]
        records.append(store.insert_job(job("acme" if i % 5 else "globex", state=state, create_time=1000.0 + i // 3)))
    newest_first = sorted(records, key=lambda r: (r.create_time, r.job_id), reverse=True)
    # A state named twice in the filter (`dreambooth jobs --state queued --state QUEUED`) lists its jobs once.
    for states in (None, {"QUEUED", "FAILED"}, {"SUCCEEDED"}, ["QUEUED", "FAILED", "QUEUED"]):
        expected = [r.job_id for r in newest_first if r.tenant == "acme" and (not states or r.state in states)]
        for page_size in (1, 7, len(expected), 1000):
            seen, token, pages = [], "", 0
            while True:
                page, token = store.list_jobs("acme", page_size, token, states=states)
                assert 0 < len(page) <= page_size
                seen += [j.job_id for j in page]
                pages += 1
                if not token:
                    break
            assert seen == expected  # every job exactly once, newest first
            assert pages == -(-len(expected) // page_size)  # no empty trailing page
    assert store.list_jobs("nobody", 10) == ([], "")


def test_bad_page_token(store):
    for _ in range(3):
        store.insert_job(job())
    _, token = store.list_jobs("acme", 1)
    assert token and store.list_jobs("acme", 1, token)[0]
    _, model_token = _models_with_token(store)
    bad = [
        "!!!not-base64",
        "Zm9v",  # base64 of "foo": not JSON
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b'["j", "yesterday", "job-1"]').decode(),
        "é",
        model_token,  # a models token is not a jobs token
        base64.urlsafe_b64encode(b'["j", 1.0, "job-\\u0000"]').decode(),  # a key no store can hold (PostgreSQL)
    ]
    for token in bad:
        with pytest.raises(ValueError):
            store.list_jobs("acme", 1, token)
    with pytest.raises(ValueError):
        store.list_jobs("acme", 0)
    # A token carries its states filter: reused with another, it would page from the middle of a different list.
    _, queued_token = store.list_jobs("acme", 1, states=["QUEUED"])
    assert store.list_jobs("acme", 1, queued_token, states=["QUEUED"])[0]
    for other in (None, ["FAILED"], ["QUEUED", "FAILED"]):
        with pytest.raises(ValueError):
            store.list_jobs("acme", 1, queued_token, states=other)
    with pytest.raises(ValueError):
        store.list_jobs("acme", 1, token, states=["QUEUED"])


def test_keys_with_nul_find_nothing(store):
    """Clients may send NUL in proto3 strings; PostgreSQL's text cannot hold one (a query with it fails there):
    such a key finds nothing, on both databases, rather than failing the call."""
    inserted = store.insert_job(job(request_id="r-1"))
    assert store.get_job(inserted.job_id + "\x00") is None
    assert store.find_by_request_id("acme", "r-1\x00") is None
    assert store.get_model("model-1\x00") is None


def test_text_a_database_would_refuse_is_stored_cleaned(store):
    """A trainer's failure message or the tail of Ray's log may hold a NUL, which PostgreSQL's text refuses (the
    whole statement, DataError), or a lone surrogate (an undecodable file name), which no UTF-8 holds (both refuse);
    a reason code from another trainer version may pass the column's 64 characters (PostgreSQL refuses it). Each
    failed the job's end on every reconcile pass: stored instead, the refused characters as U+FFFD, the reason cut."""
    running = store.insert_job(job(state="TRAINING"))
    message = "RuntimeError: bad byte \x00 in config; photo caf\udce9.jpg"
    ended = store.transition(running.job_id, {"TRAINING"}, "FAILED", failure_reason="R" * 100, failure_message=message)
    cleaned = "RuntimeError: bad byte \ufffd in config; photo caf\ufffd.jpg"
    assert (ended.failure_reason, ended.failure_message) == ("R" * 64, cleaned)
    assert store.get_job(running.job_id) == ended
    updated = store.update_job(running.job_id, failure_message="tail\x00", failure_reason="RAY_JOB_FAILED")
    assert (updated.failure_reason, updated.failure_message) == ("RAY_JOB_FAILED", "tail\ufffd")
    model = store.insert_model(ModelRecord(model_id="model-1", tenant="acme", job_id=running.job_id, path="/m/\x00"))
    assert model.path == "/m/\ufffd" == store.get_model("model-1").path
    assert store.update_model("model-1", endpoint="http://serve/\x00").endpoint == "http://serve/\ufffd"


def test_an_event_the_database_refuses_is_skipped_not_applied_on_every_pass(url, tmp_path):
    """A value the database refuses in a trainer's event (a checkpoint step past PostgreSQL's INTEGER, or SQLite's)
    raised from every pass's reading of the job's events: the job stayed TRAINING for good, holding its tenant's
    slot, past max_job_run_s. Skipped as an event it cannot apply; the events after it apply."""
    from controller.config import ControllerConfig, Tenant
    from controller.feed import ChangeFeed
    from controller.ray_jobs import RayJobs
    from controller.reconciler import Reconciler
    from controller.service import JobService
    from trainer.events import EventLog
    from trainer.storage import job_paths

    config = ControllerConfig(
        storage=tmp_path / "storage",
        database_url=url,
        ray_dashboard_url=f"http://127.0.0.1:{free_port()}",  # never asked here
        tenants=(Tenant("acme", ("acme-token",)),),
    )
    config.storage.mkdir()
    store = Store(url)
    try:
        service = JobService(
            config, store, RayJobs(config.ray_dashboard_url, storage_root=str(config.storage)), ChangeFeed()
        )
        reconciler = Reconciler(config, store, service.ray_jobs, service.feed, service)
        running = store.insert_job(job(state="QUEUED"))
        running = store.transition(running.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id="s-a1")
        events = job_paths(config.storage, running.job_id).events_file
        events.parent.mkdir(parents=True)
        log = EventLog(events)
        log.emit("progress", step=3, total_steps=10, loss=0.5)
        log.emit("checkpoint", step=2**31, path="/x")  # INTEGER's range ends at 2**31 - 1 on PostgreSQL
        log.emit("checkpoint", step=2**63, path="/x")  # SQLite's at 2**63 - 1 (OverflowError, not DataError)
        log.emit("checkpoint", step="2", path="/x")  # SQLite would store the text
        log.emit("state", state="FAILED", reason="TRAINING_FAILED", message="NaN loss\x00")
        ended = reconciler._apply_events(running)
        assert (ended.state, ended.failure_message, ended.events_offset) == (
            "FAILED",
            "NaN loss\ufffd",
            events.stat().st_size,
        )
        assert store.get_job(running.job_id).progress["step"] == 3
    finally:
        store.close()


def _models_with_token(store) -> tuple[list[ModelRecord], str]:
    for i in range(2):
        store.insert_model(ModelRecord(model_id=f"model-{i}", tenant="acme", job_id=f"job-{i}", path=f"/m/{i}"))
    return store.list_models("acme", 1)


def test_update_and_delete(store):
    a, b = store.insert_job(job()), store.insert_job(job())
    assert (a.seq, b.seq) == (1, 2)  # the order of insertion
    updated = store.update_job(a.job_id, progress={"step": 5, "loss": 0.25}, events_offset=1234, attempts=1)
    assert updated.seq == 1 and updated.update_time >= a.update_time
    assert updated.progress == {"step": 5, "loss": 0.25} and updated.events_offset == 1234
    assert store.get_job(b.job_id) == b  # untouched
    with pytest.raises(KeyError):
        store.update_job("job-nope", attempts=1)
    with pytest.raises(TypeError):
        store.update_job(a.job_id, seq=99)
    with pytest.raises(ValueError):
        store.update_job(a.job_id, state="STATE_QUEUED")
    assert store.delete_job(b.job_id) and store.get_job(b.job_id) is None
    assert not store.delete_job(b.job_id)
    assert store.insert_job(job()).seq == 3  # never goes back


def test_transition_compare_and_set(store):
    j = store.insert_job(job())
    assert store.transition(j.job_id, {"TRAINING"}, "SUCCEEDED") is None
    started = store.transition(j.job_id, {"QUEUED"}, "PREPARING", start_time=123.0, attempts=1)
    assert (started.state, started.start_time, started.attempts) == ("PREPARING", 123.0, 1)
    assert store.transition("job-nope", {"QUEUED"}, "PREPARING") is None


def test_transition_race_has_one_winner(store):
    """Cancel and completion racing out of TRAINING: exactly one wins."""
    ids = [store.insert_job(job(state="TRAINING")).job_id for _ in range(40)]
    outcomes: dict[str, list] = {i: [] for i in ids}

    def race(to_state: str, barrier: threading.Barrier):
        barrier.wait()
        for job_id in ids:
            result = store.transition(job_id, {"TRAINING"}, to_state, end_time=time.time())
            outcomes[job_id].append((to_state, result))

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=race, args=(s, barrier)) for s in ("CANCELLING", "SUCCEEDED") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job_id, results in outcomes.items():
        winners = [(state, r) for state, r in results if r is not None]
        assert len(results) == 4 and len(winners) == 1
        assert store.get_job(job_id) == winners[0][1]


def test_scheduler_queries(store):
    low = store.insert_job(job(priority=0, create_time=1.0))
    high_late = store.insert_job(job(priority=5, create_time=3.0))
    high_early = store.insert_job(job("globex", priority=5, create_time=2.0))
    running = store.insert_job(job(state="TRAINING", create_time=0.5))
    store.insert_job(job(state="SUCCEEDED"))
    assert [j.job_id for j in store.queued_jobs()] == [high_early.job_id, high_late.job_id, low.job_id]
    assert [j.job_id for j in store.active_jobs()] == [running.job_id]
    counts = store.count_jobs_by_state()
    assert set(counts) == set(STATES)
    assert (counts["QUEUED"], counts["TRAINING"], counts["SUCCEEDED"], counts["FAILED"]) == (3, 1, 1, 0)
    assert store.count_tenant_jobs("acme", ACTIVE_STATES) == 1
    assert store.count_tenant_jobs("acme", frozenset({"QUEUED", "TRAINING"})) == 3
    assert store.queued_by_tenant() == {"acme": 2, "globex": 1}

    # A scheduling pass reads each queued job's spec once: the next passes read the queue without them.
    specs: dict[str, dict] = {}
    assert store.queued_jobs(specs) == store.queued_jobs()
    assert specs == {j.job_id: j.spec for j in (low, high_late, high_early)}
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert [j.job_id for j in store.queued_jobs(specs)] == [high_early.job_id, high_late.job_id, low.job_id]
    assert len(statements) == 1 and "spec" not in statements[0]
    store.transition(low.job_id, {"QUEUED"}, "CANCELLED")
    store.queued_jobs(specs)
    assert set(specs) == {high_late.job_id, high_early.job_id}  # no longer queued: forgotten


def test_hot_queries_read_only_the_jobs_they_find(tmp_path):
    """The reconciler's per-pass count of unfinished jobs and a list filtered by state (say, a tenant's few
    running jobs among thousands of finished ones) read index ranges of those states, not every job ever kept:
    SQLite's query plans for the statements the store runs."""
    store = Store(f"sqlite:///{tmp_path / 'controller.db'}")
    statements: list[tuple[str, tuple]] = []

    def record(conn, cursor, sql, params, *_):
        statements.append((sql, params))

    sa.event.listen(store.engine, "before_cursor_execute", record)

    def plans(call) -> list[str]:
        statements.clear()
        call()
        ran = list(statements)  # not the EXPLAINs below
        with store.engine.connect() as conn:
            return [row[-1] for sql, params in ran for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]

    counting = plans(lambda: store.count_jobs_by_state(UNFINISHED_STATES))
    assert counting and all(line.startswith("SEARCH") and "(state=?)" in line for line in counting), counting
    listing = plans(lambda: store.list_jobs("acme", 50, states={"TRAINING", "QUEUED"}))
    # One statement: each state's range of the index, merged (the scans are of those ranges' rows, not of jobs).
    searches = [line for line in listing if line.startswith(("SEARCH", "SCAN"))]
    assert [line for line in searches if " jobs " in f"{line} "] == [
        "SEARCH jobs USING INDEX ix_jobs_list_by_state (tenant=? AND state=?)"
    ] * 2, listing
    # A page deep into the history starts where its token says, in the index (SQLAlchemy writes "OFFSET 0" on
    # SQLite: nothing skipped), and counts nothing.
    for _ in range(3):
        store.insert_job(job(state="SUCCEEDED"))
    _, token = store.list_jobs("acme", 1)
    paging = plans(lambda: store.list_jobs("acme", 1, token))
    assert paging and all(line.startswith("SEARCH") and "(create_time,job_id)<" in line for line in paging), paging
    assert not any("COUNT(" in sql.upper() for sql, _ in statements), statements
    store.close()


# --- models -----------------------------------------------------------------------------------------------


def test_models_crud(store):
    model = ModelRecord(model_id="model-1", tenant="acme", job_id="job-1", path="/m/1", metadata={"steps": 400})
    assert store.insert_model(model) == model
    assert store.get_model("model-1") == model
    assert store.get_model("model-1", tenant="globex") is None
    deployed = store.update_model("model-1", deployed=True, endpoint="http://serve/model-1")
    assert deployed.deployed is True and deployed.endpoint == "http://serve/model-1"
    assert store.get_model("model-1", tenant="acme") == deployed
    with pytest.raises(KeyError):
        store.update_model("model-2", deployed=True)
    with pytest.raises(TypeError):
        store.update_model("model-1", model_id="x")
    for i in range(2, 12):
        store.insert_model(dataclasses.replace(model, model_id=f"model-{i}", create_time=float(i)))
    store.insert_model(dataclasses.replace(model, model_id="theirs", tenant="globex"))
    seen, token = [], ""
    while True:
        page, token = store.list_models("acme", 4, token)
        seen += [m.model_id for m in page]
        if not token:
            break
    assert seen == ["model-1"] + [f"model-{i}" for i in range(11, 1, -1)]


def test_a_deployed_models_row_is_not_deleted(store):
    """DeleteModel's last step: a model deployed since its caller checked keeps its row, which serving follows."""
    store.insert_model(ModelRecord(model_id="model-1", tenant="acme", job_id="job-1", path="/m/1"))
    deployed = store.update_model("model-1", deployed=True, endpoint="http://serve/model-1")
    assert store.delete_model("model-1") is False and store.get_model("model-1") == deployed
    store.update_model("model-1", deployed=False, endpoint="")
    assert store.delete_model("model-1") is True and store.get_model("model-1") is None
    assert store.delete_model("model-1") is False


# --- durability (SQLite) ----------------------------------------------------------------------------------


def test_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'var' / 'lib' / 'controller.db'}"  # a folder not made yet, as a new host has
    store = Store(url)
    stored = store.update_job(store.insert_job(job(request_id="r")).job_id, progress={"step": 7})
    store.close()
    reopened = Store(url)
    assert reopened.get_job(stored.job_id) == stored and reopened.insert_job(job()).seq == 2
    assert reopened.insert_job(job(request_id="r")) == stored
    with reopened.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    reopened.close()


def _child(script: str, url: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, url], cwd=ROOT, env=env, text=True, **kwargs)


def test_survives_exit_without_close(tmp_path):
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    script = (
        "import os, sys\n"
        "from controller.store import JobRecord, Store\n"
        "s = Store(sys.argv[1])\n"
        "j = s.insert_job(JobRecord(tenant='acme', spec={'k': 1}, job_id='job-000000000001'))\n"
        "s.update_job(j.job_id, state='TRAINING', attempts=1)\n"
        "os._exit(9)\n"
    )
    assert _child(script, url).wait(timeout=60) == 9
    store = Store(url)
    got = store.get_job("job-000000000001")
    assert (got.state, got.attempts, got.spec) == ("TRAINING", 1, {"k": 1})
    store.close()


def test_survives_sigkill_mid_write(tmp_path):
    """kill -9 while a writer commits in a loop: everything it reported committed is there, the file is sound."""
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    script = (
        "import sys, itertools\n"
        "from controller.store import JobRecord, Store\n"
        "s = Store(sys.argv[1])\n"
        "for i in itertools.count():\n"
        "    j = s.insert_job(JobRecord(tenant='acme', spec={'i': i}, request_id=str(i)))\n"
        "    s.update_job(j.job_id, state='TRAINING', progress={'step': i})\n"
        "    print(j.job_id, i, flush=True)\n"
    )
    child = _child(script, url, stdout=subprocess.PIPE)
    committed = [child.stdout.readline().split() for _ in range(150)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    store = Store(url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    for job_id, i in committed:
        got = store.get_job(job_id)
        assert (got.state, got.progress) == ("TRAINING", {"step": int(i)})
    store.close()


# --- scale ------------------------------------------------------------------------------------------------


def test_deep_page_of_100k_jobs(tmp_path, capsys):
    """Every job listed once, in order, across 100k jobs with tied timestamps; prints how long a deep page takes
    (its query plan: test_hot_queries_read_only_the_jobs_they_find)."""
    store = Store(f"sqlite:///{tmp_path / 'controller.db'}")
    n = 100_000
    rows = []
    for i in range(n):  # 4 jobs per timestamp (ties), 1 in 10 in another tenant, states mixed
        record = job("globex" if i % 10 == 0 else "acme", state=STATES[i % 8], create_time=1.7e9 + (i // 4) * 0.001)
        rows.append({**dataclasses.asdict(record), "update_time": record.create_time, "seq": i + 1})
    started = time.perf_counter()
    with store.engine.begin() as conn:
        conn.execute(jobs.insert(), rows)
    insert_s = time.perf_counter() - started
    expected = sorted((r for r in rows if r["tenant"] == "acme"), key=lambda r: (r["create_time"], r["job_id"]))
    expected = [r["job_id"] for r in reversed(expected)]

    # Walk every page once (each job exactly once), keeping the token that starts the deep page.
    seen, token, deep_token = [], "", None
    while True:
        page, token = store.list_jobs("acme", 1000, token)
        seen += [j.job_id for j in page]
        if len(seen) == 80_000:
            deep_token = token
        if not token:
            break
    assert seen == expected

    def timed(token: str, states=None) -> tuple[list[str], float]:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            page, _ = store.list_jobs("acme", 50, token, states=states)
            times.append(time.perf_counter() - t0)
        return [j.job_id for j in page], statistics.median(times) * 1000

    page, deep_ms = timed(deep_token)
    assert page == expected[80_000:80_050]
    # The filtered list's token at the same place (a token carries its filter): after its jobs among the first 80,000.
    by_id = {r["job_id"]: r for r in rows}
    before = sum(by_id[i]["state"] in {"FAILED", "CANCELLED"} for i in expected[:80_000])
    filtered_token, walked = "", 0
    while walked < before:
        page, filtered_token = store.list_jobs(
            "acme", min(1000, before - walked), filtered_token, {"FAILED", "CANCELLED"}
        )
        walked += len(page)
    filtered, filtered_ms = timed(filtered_token, {"FAILED", "CANCELLED"})
    assert filtered == [i for i in expected[80_000:] if by_id[i]["state"] in {"FAILED", "CANCELLED"}][:50]
    with capsys.disabled():
        print(
            f"\n[store] 100k jobs: bulk insert {insert_s:.2f} s; page of 50 after 80,000 jobs: {deep_ms:.2f} ms "
            f"(median of 20), with a 2-state filter: {filtered_ms:.2f} ms"
        )
    store.close()


MOUNTS = """\
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
fs-1.efs.eu-west-1.amazonaws.com:/ /shared nfs4 rw,vers=4.1 0 0
/dev/nvme1n1 /shared/local\\040disk xfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "kind", "network"),
    [
        ("/var/lib/dreambooth", "ext4", False),
        ("/shared/dreambooth", "nfs4", True),  # the README's storage: the default database would land here
        ("/shared", "nfs4", True),
        ("/shared/local disk/db", "xfs", False),  # a mount inside the shared one
        ("/sharedother", "ext4", False),  # a name that starts alike is not inside /shared
    ],
)
def test_a_database_on_a_network_file_system_is_recognised(path, kind, network):
    assert filesystem_type(Path(path), MOUNTS) == kind
    assert is_network_filesystem(kind) is network


def set_schema_version(store: Store, version: int | None) -> None:
    """Stamps the database as that version wrote it (None: as one from before the stamp existed)."""
    stamp = counters.c.name == "schema_version"
    with store.engine.begin() as conn:
        conn.execute(counters.delete().where(stamp))
        if version is not None:
            conn.execute(counters.insert().values(name="schema_version", value=version))


def schema_version(store: Store) -> int | None:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(counters.c.value).where(counters.c.name == "schema_version")).scalar()


def test_a_database_a_later_version_wrote_is_refused(url):
    """An operator rolling back after an upgrade: this controller would write rows the later version's invariants
    do not expect. A database from before the stamp existed is this version's, and is stamped."""
    store = Store(url)
    assert schema_version(store) == SCHEMA_VERSION
    set_schema_version(store, None)
    store.close()
    store = Store(url)
    assert schema_version(store) == SCHEMA_VERSION
    set_schema_version(store, SCHEMA_VERSION + 1)
    store.close()
    with pytest.raises(SchemaMismatch, match=f"version {SCHEMA_VERSION + 1}, newer than this controller's"):
        Store(url)


def test_an_older_versions_database_is_stamped_with_this_version_once_upgraded(url):
    """create_all upgrades an older version's database; left with its old stamp, a rollback to that older version
    after the upgrade was not refused, the guard the stamp exists for."""
    store = Store(url)
    set_schema_version(store, SCHEMA_VERSION - 1)
    store.close()
    store = Store(url)
    assert schema_version(store) == SCHEMA_VERSION
    store.close()


def test_a_database_keeps_its_id_and_one_from_before_the_id_gets_one(url, tmp_path):
    """Submissions' folders are marked with it (controller.orphans): it must not change across restarts, nor be
    another database's."""
    store = Store(url)
    drawn = store.database_id()
    store.close()
    store = Store(url)
    assert store.database_id() == drawn
    with store.engine.begin() as conn:  # as a database from before the id existed
        conn.execute(counters.delete().where(counters.c.name == "database_id"))
    store.close()
    store = Store(url)
    assert store.database_id() not in (None, drawn)
    store.close()
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    assert other.database_id() != drawn
    other.close()


def test_one_controller_holds_a_database_at_a_time(url):
    first, second = Store(url), Store(url)
    try:
        with (
            first.hold_for_one_controller(),
            pytest.raises(ControllerRunning, match="another controller"),
            second.hold_for_one_controller(),
        ):
            pass
        with second.hold_for_one_controller():  # released with the first
            pass
    finally:
        first.close()
        second.close()


def test_a_hold_on_the_database_that_ended_with_its_session_is_seen(url):
    """PostgreSQL's session lock ends with its session (a database restart or failover, a cut connection): the
    controller that held it must learn it, as a second controller could now take the database."""
    first, second = Store(url), Store(url)
    try:
        with first.hold_for_one_controller() as still_held:
            assert still_held() and still_held()
            if first.engine.url.get_backend_name() != "postgresql":
                return  # SQLite's file lock lasts as long as the process
            with second.engine.connect() as admin:  # as a failover would: every session of the lock's ends
                admin.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND pid <> pg_backend_pid()"
                    )
                )
            assert not still_held()
            with second.hold_for_one_controller():  # what the first must no longer act as if it held
                pass
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_postgresql_connections_find_a_vanished_peer_within_seconds(url):
    """The one-controller hold is a session lock that ends only once the server sees its client gone: with the
    OS's keepalive defaults, a controller host that lost power kept its replacement out for 2 h 11 min. And a
    connection to a server gone silent (a failover) blocked its user for ~15 min. Both sides of each connection
    probe a quiet peer (the server's settings read with SHOW; the client's, libpq's, from its socket), unless the
    URL sets its own."""
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            shown = [
                conn.exec_driver_sql(f"SHOW tcp_keepalives_{name}").scalar() for name in ("idle", "interval", "count")
            ]
            assert shown == ["10", "5", "3"]  # over TCP (127.0.0.1): the server reports its socket's
            dbapi = conn.connection.dbapi_connection
            assert dbapi.info.get_parameters()["connect_timeout"] == "10"
            assert _socket_liveness(dbapi.pgconn.socket) == (1, 10, 5, 3, 30_000)
        own = Store(f"{url}?keepalives_idle=20&options=-c%20tcp_keepalives_idle%3D7")
        try:
            with own.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW tcp_keepalives_idle").scalar() == "7"
                assert conn.exec_driver_sql("SHOW tcp_keepalives_interval").scalar() == "5"
                assert _socket_liveness(conn.connection.dbapi_connection.pgconn.socket)[1] == 20
        finally:
            own.close()
    finally:
        store.close()


def _socket_liveness(fd: int) -> tuple[int, ...]:
    """SO_KEEPALIVE, TCP_KEEPIDLE (s), TCP_KEEPINTVL (s), TCP_KEEPCNT, TCP_USER_TIMEOUT (ms) of the socket `fd`."""
    sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves the connection's own
    try:
        return (
            int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0),
            *(
                sock.getsockopt(socket.IPPROTO_TCP, option)
                for option in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)
            ),
        )
    finally:
        sock.close()


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_postgresql_urls_without_a_driver_named_use_psycopg(url):
    """postgres:// (Heroku's, and many a DATABASE_URL's spelling) was no dialect SQLAlchemy knows (a traceback at
    start); postgresql:// names psycopg2 under SQLAlchemy 2.0, not installed. Both connect with psycopg."""
    assert url.startswith("postgresql+psycopg://")
    for spelling in ("postgres://", "postgresql://"):
        store = Store(spelling + url.removeprefix("postgresql+psycopg://"))
        try:
            assert store.engine.url.drivername == "postgresql+psycopg"
            stored = store.insert_job(job())
            assert store.get_job(stored.job_id) == stored
        finally:
            store.close()


def test_a_database_url_this_controller_cannot_use_is_a_setting_to_fix(tmp_path, capsys):
    """A driver not installed (psycopg2), a database SQLAlchemy has no dialect for, or no URL at all: exit 2 naming
    database_url and what to use, not a traceback and exit 1 (a restart loop)."""
    from controller.server import main

    for database_url in ("postgresql+psycopg2://u@127.0.0.1/x", "nosuchdb://u@127.0.0.1/x", "not a url"):
        config = tmp_path / "controller.yaml"
        config.write_text(f"storage: {tmp_path}\ndatabase_url: {database_url}\n")
        assert main(["--config", str(config)]) == 2, database_url
        err = capsys.readouterr().err
        assert err.startswith("error: database_url: ") and "Traceback" not in err, err
        assert "postgresql+psycopg://" in err  # what to use


def test_a_sqlite_without_returning_is_refused_at_start(tmp_path, monkeypatch, capsys):
    """SQLite before 3.35 (Debian 11, RHEL 8) has no RETURNING, which every write here uses: the controller
    started and said SERVING, then answered every submission "unavailable; retry". Refused at start (exit 2),
    naming the versions. (This machine's SQLite is newer: the version the check reads is made older.)"""
    import sqlite3.dbapi2

    from controller.server import main

    monkeypatch.setattr(sqlite3.dbapi2, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(InputError, match=r"SQLite is 3\.34\.1; the controller needs 3\.35\.0 or later") as refused:
        Store(f"sqlite:///{tmp_path / 'controller.db'}")
    assert refused.value.field == "database_url"
    assert main(["--storage", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: database_url: this Python's SQLite is 3.34.1")
    monkeypatch.setattr(sqlite3.dbapi2, "sqlite_version_info", (3, 35, 0))
    Store(f"sqlite:///{tmp_path / 'controller.db'}").close()
