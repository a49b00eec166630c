"""The device's journal: a small SQLite file that outlives the node process and the broker.

Why: the broker is not a system of record.  Mosquitto writes retained messages
only at autosave (1 s in development, 5 s in production), so a broker killed
right after a result loses it; and a node killed mid-session lost everything of
that session (``generate`` waited 150 s for nothing).  The journal keeps:

- per **unfinished** session what it takes to resume it losslessly: the nonce (so
  the re-open is the same instance), the prompt ids, sampling and limits, the
  committed tokens (the claim of the re-open, which the verifier proves), the
  latest commit tag, epoch, the last text chunk handed to the transport (its seq:
  a resumed session numbers on after it) and the position up to which the broker
  acknowledged committed text (the text of later tokens is sent again after a
  restart, as a ``correction`` from that position: a consumer misses nothing and,
  applying corrections, shows nothing twice) and the inbox request id;
- the **recently finished** sessions' results (the encoded retained payload),
  bounded to the latest ``max_results`` (256) and ``max_age_s`` (24 h), which the
  node republishes (retained) after every (re)connect.

Writes: one ``UPDATE`` per committed round (a few tens of microseconds with WAL
and ``synchronous=NORMAL``: durable against the process being killed, SIGKILL
included; a power cut may lose the last rounds, which the re-open then simply
does not claim).  Only stdlib ``sqlite3``; the path is ``[node] journal``
(``""``: in memory, i.e. off across restarts).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from middleware.protocol import SamplingParams

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    nonce TEXT NOT NULL,
    prompt TEXT NOT NULL,
    sampling TEXT NOT NULL,
    max_new_tokens INTEGER NOT NULL,
    stop_ids TEXT NOT NULL,
    committed TEXT NOT NULL,
    tag TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    text_seq INTEGER NOT NULL,
    text_pos INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    session_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    finished_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One unfinished session, as much as resuming it needs."""

    session_id: str
    nonce: str
    prompt: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    committed: tuple[int, ...] = ()
    tag: str = ""
    epoch: int = 0
    text_seq: int = 0  # the last text chunk handed to the transport
    text_pos: int = 0  # the token position the broker-acknowledged committed text reaches
    request_id: str = ""
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class StoredResult:
    session_id: str
    payload: bytes  # the encoded Result, as published
    finished_at: float  # unix seconds


class Journal:
    """Unfinished sessions and recent results of one device (not thread-safe: one event loop)."""

    def __init__(
        self, path: str | Path = "", *, max_results: int = 256, max_age_s: float = 86_400.0
    ) -> None:
        self.path = str(path)
        self.max_results = max_results
        self.max_age_s = max_age_s
        if self.path:
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(Path(self.path).expanduser()) if self.path else ":memory:", isolation_level=None
        )
        if self.path:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @property
    def persistent(self) -> bool:
        return bool(self.path)

    def close(self) -> None:
        self._db.close()

    # --- unfinished sessions -------------------------------------------------------
    def begin(self, e: JournalEntry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                e.session_id,
                e.nonce,
                json.dumps(list(e.prompt)),
                json.dumps(e.sampling.to_wire()),
                e.max_new_tokens,
                json.dumps(list(e.stop_ids)),
                json.dumps(list(e.committed)),
                e.tag,
                e.epoch,
                e.text_seq,
                e.text_pos,
                e.request_id,
                e.started_at,
            ),
        )

    def progress(self, session_id: str, committed: Sequence[int], tag: str, epoch: int) -> None:
        """The committed tokens (verified by a verdict) and the tag changed.  A no-op in
        memory: resuming needs a journal that outlives the process."""
        if not self.path:
            return
        self._db.execute(
            "UPDATE sessions SET committed=?, tag=?, epoch=? WHERE session_id=?",
            (json.dumps(list(committed)), tag, epoch, session_id),
        )

    def sending(self, session_id: str, text_seq: int) -> None:
        """Text chunk ``text_seq`` goes to the transport now: a resumed session numbers its
        chunks after it (the broker may have it even if its acknowledgement never came)."""
        if not self.path:
            return
        self._db.execute(
            "UPDATE sessions SET text_seq=MAX(text_seq, ?) WHERE session_id=?",
            (text_seq, session_id),
        )

    def published(self, session_id: str, text_pos: int) -> None:
        """The broker acknowledged committed text up to token ``text_pos``: a resumed
        session re-sends the text of later tokens only."""
        if not self.path:
            return
        self._db.execute(
            "UPDATE sessions SET text_pos=? WHERE session_id=?", (text_pos, session_id)
        )

    def unfinished(self) -> list[JournalEntry]:
        rows = self._db.execute("SELECT * FROM sessions ORDER BY started_at").fetchall()
        return [
            JournalEntry(
                session_id=r[0],
                nonce=r[1],
                prompt=tuple(json.loads(r[2])),
                sampling=SamplingParams.from_wire(json.loads(r[3])),
                max_new_tokens=r[4],
                stop_ids=tuple(json.loads(r[5])),
                committed=tuple(json.loads(r[6])),
                tag=r[7],
                epoch=r[8],
                text_seq=r[9],
                text_pos=r[10],
                request_id=r[11],
                started_at=r[12],
            )
            for r in rows
        ]

    def drop(self, session_id: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE session_id=?", (session_id,))

    # --- results -----------------------------------------------------------------------
    def finish(self, session_id: str, payload: bytes, at: float | None = None) -> None:
        """The session is over: forget its resume state, keep its result (bounded)."""
        at = time.time() if at is None else at
        with self._db:  # one transaction: never both or neither
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM sessions WHERE session_id=?", (session_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?)", (session_id, payload, at)
            )
            self._prune(at)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM results WHERE finished_at < ?", (now - self.max_age_s,))
        self._db.execute(
            "DELETE FROM results WHERE session_id NOT IN "
            "(SELECT session_id FROM results ORDER BY finished_at DESC LIMIT ?)",
            (self.max_results,),
        )

    def results(self, now: float | None = None) -> list[StoredResult]:
        """Results finished within ``max_age_s``, oldest first."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT session_id, payload, finished_at FROM results WHERE finished_at >= ? "
            "ORDER BY finished_at LIMIT ?",
            (now - self.max_age_s, self.max_results),
        ).fetchall()
        return [StoredResult(r[0], bytes(r[1]), r[2]) for r in rows]
