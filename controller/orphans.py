"""Job folders that no job owns, removed when a controller starts.

A submission makes its job's folder and stages the uploaded photos in it before the job's row commits
(controller.service.submit), and removes them if the submission fails. A controller that dies in between (killed,
out of memory, its machine lost), or that could not reach the database to learn whether the row committed, leaves
the folder behind: photos that no RPC lists or deletes, on storage every restart keeps.

A controller marks each folder it makes as a submission in progress of its database (`Store.database_id`), and
takes the mark away once the job's row has committed. At start, before the server takes a call, the folders with
this database's mark and no row in it are removed, unless the job ever started (it has events: a crash after the
row committed can leave the mark). Others are never touched: a folder made by `dreambooth train` on the same
storage or by a controller of another database, and the folder of a job whose row a restored backup of the database
lacks (it may have run, and hold checkpoints). No submission in flight is among them: none has started
yet, and a new job's folder always has a name never used before (service._new_job_dir).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from controller.store import Store
from trainer.storage import JobPaths

log = logging.getLogger(__name__)


def mark_submitting(job_dir: Path, database_id: int) -> None:
    """Marks `job_dir` as a submission in progress of the database `database_id`. Not synced: a mark a power loss
    takes only leaves that folder unswept."""
    (job_dir / _mark_name(database_id)).touch()


def mark_committed(job_dir: Path, database_id: int) -> None:
    try:
        (job_dir / _mark_name(database_id)).unlink()
    except OSError as e:  # harmless while the job's row stands
        log.warning("could not unmark %s as a submission in progress: %s", job_dir, e)


def find(storage: str | Path, store: Store) -> list[Path]:
    """The job folders under `storage` of submissions in progress of this database that it has no job for."""
    jobs_dir = Path(storage) / "jobs"
    if not jobs_dir.is_dir():
        return []
    # Listed before the rows are read: a job whose row commits in between is seen with its row.
    folders = [entry for entry in jobs_dir.iterdir() if entry.is_dir()]
    known = store.job_ids()
    mark = _mark_name(store.database_id())
    # A job that ever started has events (the reconciler touches them first): not a submission that never committed,
    # whatever a mark a crash left says (a restored backup may lack its row; its checkpoints are not to be lost).
    candidates = [f for f in folders if f.name not in known and (f / mark).exists()]
    return sorted(f for f in candidates if not JobPaths(Path(storage), f.name).events_file.exists())


def sweep(storage: str | Path, store: Store) -> list[Path]:
    """Removes the orphaned job folders, and says which they were. At once: each holds one submission's photos at
    most (its job never ran). What cannot be listed or removed now is left for the next start."""
    try:
        orphans = find(storage, store)
    except OSError as e:
        log.warning("could not look for orphaned job folders in %s: %s", storage, e)
        return []
    for folder in orphans:
        log.info("removing job folder %s: its submission never committed (the controller stopped first)", folder)
        try:
            shutil.rmtree(folder)
        except OSError as e:
            log.warning("could not remove the orphaned job folder %s: %s", folder, e)
    return orphans


def _mark_name(database_id: int) -> str:
    return f".submitting-{database_id}"
