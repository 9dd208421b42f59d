"""An in-process feed of job changes, for WatchJob streams: the reconciler publishes, each stream follows."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Change:
    seq: int
    job_id: str
    kind: str  # "state" | "queued" (what a queued job waits for) | "progress" | "checkpoint" | "validation"
    data: dict[str, Any]


@dataclass
class _Followers:
    """The streams following one job: woken by its changes only."""

    woken: threading.Condition
    count: int = 0
    last_change: int = 0  # seq of the job's latest change


class ChangeFeed:
    """The last `capacity` changes. A follower of one job is woken by that job's changes only: hundreds of watch
    streams on other jobs must not each wake, and read the feed, at every change (that took ~77 ms of CPU per
    change with 256 streams open). The reconciler waits for the changes callers asked for (a submission, a cancel),
    not for those it published itself: a pass that published its jobs' progress would wake the next at once."""

    def __init__(self, capacity: int = 10_000):
        self._changes: deque[Change] = deque(maxlen=capacity)
        self._seq = 0
        self._requests = 0  # changes published with requested=True
        self._lock = threading.Lock()
        self._any = threading.Condition(self._lock)
        self._followed: dict[str, _Followers] = {}
        self._changing: Counter[str] = Counter()  # jobs whose stored record may be ahead of what was published

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def publish(self, job_id: str, kind: str, data: dict[str, Any] | None = None, *, requested: bool = False) -> None:
        """Publishes a change of `job_id`; `requested`: one a caller asked for, which the reconciler acts on."""
        with self._lock:
            self._seq += 1
            self._requests += requested
            self._changes.append(Change(self._seq, job_id, kind, data or {}))
            self._any.notify_all()
            if (followers := self._followed.get(job_id)) is not None:
                followers.last_change = self._seq
                followers.woken.notify_all()

    @contextlib.contextmanager
    def changing(self, job_id: str) -> Iterator[None]:
        """Around a change of `job_id`'s stored state and the publishing of it: a reader of the store meanwhile may
        see what the feed does not hold yet (`settled` says so)."""
        with self._lock:
            self._changing[job_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._changing[job_id] -= 1
                if not self._changing[job_id]:
                    del self._changing[job_id]

    def settled(self, job_id: str, after: int) -> bool:
        """Whether the feed, up to seq `after`, holds every change of `job_id` the store has: none is being made
        (`changing`) and none was published since. A record read before this is true is no newer than the feed."""
        with self._lock:
            return not self._changing[job_id] and not any(c.job_id == job_id for c in self._since(after))

    def wait_for_request(self, after: int, timeout_s: float) -> bool:
        """Until more than `after` requested changes (`requests`) were published, or `timeout_s` passed; whether
        they were."""
        with self._lock:
            return self._any.wait_for(lambda: self._requests > after, timeout=timeout_s)

    def follow(self, job_id: str, after: int, timeout_s: float) -> tuple[int, list[Change], bool]:
        """Waits up to `timeout_s` for a change of `job_id` published after seq `after`. Returns the seq read up
        to, the job's changes after `after`, and whether the feed no longer held some of them (a follower that fell
        more than `capacity` behind: it should read the job itself)."""
        with self._lock:
            followers = self._followed.get(job_id)
            if followers is None:
                latest = [c.seq for c in self._since(after) if c.job_id == job_id]
                followers = _Followers(threading.Condition(self._lock), last_change=max(latest, default=0))
                self._followed[job_id] = followers
            followers.count += 1
            try:
                followers.woken.wait_for(lambda: followers.last_change > after, timeout=timeout_s)
                since = self._since(after)
                missed = self._seq > after and (not since or since[0].seq > after + 1)
                return self._seq, [c for c in since if c.job_id == job_id], missed
            finally:
                followers.count -= 1
                if not followers.count:
                    del self._followed[job_id]

    def _since(self, after: int) -> list[Change]:
        """The held changes after seq `after`, reading only those (the newest end of the deque)."""
        newer = min(self._seq - after, len(self._changes))
        return list(itertools.islice(reversed(self._changes), max(newer, 0)))[::-1]
