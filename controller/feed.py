"""An in-process feed of job changes, for WatchJob streams: the reconciler publishes, each stream follows."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Change:
    seq: int
    job_id: str
    kind: str  # "state" | "progress" | "checkpoint" | "validation"
    data: dict[str, Any]


class ChangeFeed:
    def __init__(self, capacity: int = 10_000):
        self._changes: deque[Change] = deque(maxlen=capacity)
        self._seq = 0
        self._condition = threading.Condition()

    @property
    def seq(self) -> int:
        with self._condition:
            return self._seq

    def publish(self, job_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._condition:
            self._seq += 1
            self._changes.append(Change(self._seq, job_id, kind, data or {}))
            self._condition.notify_all()

    def wait(self, after: int, timeout_s: float) -> list[Change]:
        """Changes published after seq `after`, waiting up to `timeout_s` for the first one. A follower that
        fell more than `capacity` behind gets what is left (each Watch message carries the whole job anyway)."""
        with self._condition:
            self._condition.wait_for(lambda: self._seq > after, timeout=timeout_s)
            return [c for c in self._changes if c.seq > after]
