"""The run history: every run, kept in a SQLite database in the user data folder.

A run is written when it starts (status "running") and completed when it ends, each in its own
committed transaction, in WAL mode: a crash mid-run loses nothing already stored, and leaves that
run marked "running" (shown as interrupted). The schema is versioned with `PRAGMA user_version`;
opening an older database migrates it in one transaction. A corrupt or locked database raises
HistoryError with a message saying what to do; callers turn history off and carry on.

Reading validates what a row holds: a JSON column that does not parse, or parses to the wrong kind
(a list where the parameters' object belongs), reads as empty and is named in `RunRecord.damaged`,
so one damaged row is shown (and its text kept) instead of making the whole history unreadable.
An id SQLite cannot hold is simply not in the history.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kvstudio.core.errors import KVStudioError
from kvstudio.core.plugins.loader import user_data_dir
from kvstudio.core.storage import cache_label, changed_fields, split_cache_name, storage_config, storage_fields

SCHEMA_VERSION = 4
PREVIEW_CHARS = 200
STORAGE_KEY = "storage"  # in a row's parameters: the run's storage fields (core.storage.STORAGE_KEY)
LOCK_TIMEOUT_S = 2.0
SQLITE_MAX_ID = 2**63 - 1  # SQLite's INTEGER; a larger id is in no row
# The JSON columns of a row and the kind each must hold.
JSON_COLUMNS = {"parameters": dict, "figures": dict, "steps": list, "settings": dict, "memory": list}
LIST_COLUMNS = ("id, created, model, policy, parameters, prompt_sha256, prompt_preview, output, status, figures, "
                "settings, error, kind")

# MIGRATIONS[n] takes a database at version n - 1 to version n.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE runs (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               created TEXT NOT NULL,
               model TEXT NOT NULL,
               policy TEXT NOT NULL,
               parameters TEXT NOT NULL,
               prompt_sha256 TEXT NOT NULL,
               prompt_preview TEXT NOT NULL,
               output TEXT NOT NULL DEFAULT '',
               status TEXT NOT NULL,
               figures TEXT NOT NULL DEFAULT '{}'
           )""",
    ],
    2: [  # per-step records, the generation settings, the failure message, and a faster list
        "ALTER TABLE runs ADD COLUMN steps TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE runs ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE runs ADD COLUMN error TEXT",
        "CREATE INDEX runs_created ON runs(created)",
    ],
    3: [  # every memory reading (timer ones too), and the run's events to reopen its views
        "ALTER TABLE runs ADD COLUMN memory TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE run_events (
               run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
               data BLOB NOT NULL
           )""",
    ],
    4: [  # what a row is: a generation run, or a fine-tune session (core/train/records.py)
        "ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'generate'",
    ],
}


class HistoryError(KVStudioError):
    """The run history cannot be used; the message says why and what to do."""


@dataclass
class RunRecord:
    id: int | None
    created: str
    model: str
    policy: str
    parameters: dict
    prompt_sha256: str
    prompt_preview: str
    status: str  # running | finished | cancelled | interrupted | failed (core/runtime/interruptions.py says which is which)
    output: str = ""
    figures: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    error: str | None = None
    memory: list = field(default_factory=list)  # every memory reading of the run
    kind: str = "generate"  # generate | finetune
    damaged: list = field(default_factory=list)  # columns whose stored value was unreadable (read as empty)

    @property
    def shown_status(self) -> str:
        if self.status == "running":  # never finished: the process died (a crash, SIGKILL)
            return "interrupted"
        if self.status == "failed" and self.error == "KeyboardInterrupt":  # Ctrl-C, as versions before 16 stored it
            return "cancelled"
        return self.status

    @property
    def storage(self) -> dict:
        """The storage fields that differ from the defaults ({} for fp on the device, and for runs
        stored before the history kept them)."""
        return self.parameters.get(STORAGE_KEY) or {}

    @property
    def cache(self) -> str:
        """The cache the run used, named as a run's summary names it: 'h2o', 'h2o-int8', 'full+minicache'."""
        return cache_label(self.policy, self.storage)

    def to_dict(self) -> dict:
        """The record's fields, with the cache's name beside its policy and its storage in words."""
        data = {}
        for key, value in vars(self).items():
            if key == "damaged" and not value:
                continue
            data[key] = value
            if key == "policy":
                data["cache"] = self.cache
            elif key == "parameters" and self.storage:
                data["storage"] = storage_config(self.storage).describe()
        return data | {"status": self.shown_status}


def stored_policy(policy: str, parameters: dict) -> tuple[str, dict]:
    """The policy name and parameters a row keeps: a cache name ('h2o-int4', a Compare column's) becomes
    its policy ('h2o') with the codec under parameters["storage"], which holds only the storage fields
    that differ from the defaults. So the policy column finds all of a policy's runs, whatever their
    storage, and RunRecord.cache names the cache back."""
    fields = storage_fields(policy, parameters.get(STORAGE_KEY))
    parameters = {k: v for k, v in parameters.items() if k != STORAGE_KEY}
    if fields:
        changed = changed_fields(storage_config(fields))
        parameters |= {STORAGE_KEY: changed} if changed else {}
    return split_cache_name(policy)[0], parameters


def record_from_result(model: str, policy: str, parameters: dict, prompt: str, result) -> RunRecord:
    """A RunRecord for a run that is not in the history (history off), e.g. to export it."""
    data = result.to_dict()
    policy, parameters = stored_policy(policy, parameters)
    return RunRecord(None, datetime.now(timezone.utc).isoformat(timespec="seconds"), model, policy, parameters,
                     hashlib.sha256(prompt.encode("utf-8")).hexdigest(), prompt[:PREVIEW_CHARS],
                     "cancelled" if result.stop_reason == "cancelled" else "finished", result.text,
                     {k: v for k, v in data.items() if k not in ("steps", "text", "token_ids", "memory")}, data["steps"],
                     memory=data["memory"])


def default_path() -> Path:
    return user_data_dir() / "history.sqlite3"


class RunHistory:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # the data folder is a file, or cannot be made
            why = "it is a file, not a folder" if self.path.parent.is_file() else error.strerror or str(error)
            raise HistoryError(f"the run history cannot be kept in {self.path.parent}: {why}; history is off. "
                               "Move that file away, or set KVSTUDIO_DATA_DIR to a folder") from error
        if self.path.is_dir():
            raise HistoryError(f"the run history {self.path} is a folder, not a database; history is off. Move it "
                               "away to start a new history")
        try:
            self.connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)
            self.connection.row_factory = sqlite3.Row
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=NORMAL")
            if self.connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            self._migrate()
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise HistoryError(f"the run history {self.path} is locked by another process; "
                                   "history is off until it is free") from error
            raise self._corrupt(error) from error
        except sqlite3.DatabaseError as error:
            raise self._corrupt(error) from error

    def _corrupt(self, error) -> HistoryError:
        return HistoryError(f"the run history {self.path} is unreadable ({error}); history is off. Move the "
                            "file away to start a new history; your runs in it are not deleted")

    def _migrate(self) -> None:
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"the run history {self.path} was written by a newer KV Studio "
                               f"(schema {version}, this one knows {SCHEMA_VERSION}); history is off")
        if version == SCHEMA_VERSION:
            return
        with self.connection:  # all migrations in one transaction: never half a schema
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self.connection.execute(statement)
            self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.connection.close()

    # -- writing ----------------------------------------------------------------------------------

    def start(self, model: str, policy: str, parameters: dict, prompt: str, settings: dict | None = None,
              kind: str = "generate") -> int:
        """Record a run as it starts; returns its id."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        policy, parameters = stored_policy(policy, parameters)
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        with self._writing():
            cursor = self.connection.execute(
                "INSERT INTO runs (created, model, policy, parameters, prompt_sha256, prompt_preview, status, "
                "settings, kind) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (created, model, policy, json.dumps(parameters), digest, prompt[:PREVIEW_CHARS],
                 json.dumps(settings or {}), kind))
        return cursor.lastrowid

    def finish_figures(self, run_id: int, status: str, output: str, figures: dict, steps: list, memory: list,
                       error: str | None = None) -> None:
        """Complete a row that is not a generation run (a fine-tune session) from plain data."""
        with self._writing():
            self.connection.execute(
                "UPDATE runs SET status = ?, output = ?, figures = ?, steps = ?, memory = ?, error = ? WHERE id = ?",
                (status, output, json.dumps(figures), json.dumps(steps), json.dumps(memory), error, run_id))

    def finish(self, run_id: int, result=None, status: str | None = None, error: str | None = None,
               events: bytes | None = None, partial: tuple[str, dict] | None = None) -> None:
        """Complete a run with its GenerationResult, or end it with `status` (failed, cancelled,
        interrupted) and the error, keeping the `partial` (text, figures) it had produced
        (interruptions.partial_output). `events` (recordings.pack_events) lets the studio reopen
        the run's views later."""
        if result is None:
            output, figures = partial or ("", {})
            values = (status or "failed", output, json.dumps(figures), "[]", "[]", error, run_id)
        else:
            data = result.to_dict()
            figures = {key: data[key] for key in ("prompt_tokens", "tokens_per_second", "prefill_seconds",
                                                  "decode_seconds", "peak_cache_bytes", "evictions", "left_window",
                                                  "kept_per_layer", "peak_kept_per_layer", "stop_reason",
                                                  "storage")}
            figures["generated_tokens"] = len(result.token_ids)
            run_status = "cancelled" if result.stop_reason == "cancelled" else "finished"
            values = (run_status, result.text, json.dumps(figures), json.dumps(data["steps"]),
                      json.dumps(data["memory"]), error, run_id)
        with self._writing():  # the run and its events in one transaction
            self.connection.execute(
                "UPDATE runs SET status = ?, output = ?, figures = ?, steps = ?, memory = ?, error = ? WHERE id = ?",
                values)
            if events is not None:
                self.connection.execute("INSERT OR REPLACE INTO run_events (run_id, data) VALUES (?, ?)",
                                        (run_id, events))

    def delete(self, run_id: int) -> bool:
        if not 0 <= run_id <= SQLITE_MAX_ID:
            return False
        with self._writing():
            self.connection.execute("DELETE FROM run_events WHERE run_id = ?", (run_id,))
            return self.connection.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0

    def _writing(self):
        return _Writing(self)

    # -- reading ----------------------------------------------------------------------------------

    def list(self, policy: str | None = None, model: str | None = None, text: str | None = None,
             limit: int = 50) -> list[RunRecord]:
        """Newest first, without per-step records. `policy`: a policy's runs whatever their storage ('h2o'),
        or one cache's ('h2o-int8', 'full+minicache': what RunRecord.cache names)."""
        clauses, values = [], []
        if model:
            clauses.append("model = ?")
            values.append(model)
        if policy:  # rows from before the storage was kept may name a cache ('h2o-int4') in the policy column
            base = stored_policy(policy, {})[0]
            clauses.append("(policy = ? OR policy LIKE ? OR policy LIKE ?)")
            values += [base, f"{base}-%", f"{base}+%"]
        if text:
            clauses.append("(prompt_preview LIKE ? OR output LIKE ?)")
            values += [f"%{text}%"] * 2
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reading():
            # Not the per-step records and memory readings: they are the bulk of a row.
            rows = self.connection.execute(f"SELECT {LIST_COLUMNS} FROM runs {where} ORDER BY id DESC",
                                           values).fetchall()
        records = (self._record(row, with_steps=False) for row in rows)
        if policy:  # the LIKEs find candidates ('_' matches any letter); the names decide
            records = (r for r in records if stored_policy(r.policy, {})[0] == base
                       and (policy == base or r.cache == policy))
        return list(itertools.islice(records, limit))

    def get(self, run_id: int) -> RunRecord:
        row = None
        if 0 <= run_id <= SQLITE_MAX_ID:
            with self._reading():
                row = self.connection.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no run {run_id} in the history (`kvstudio runs list` shows the ids)")
        return self._record(row, with_steps=True)

    def events(self, run_id: int) -> bytes | None:
        """The run's packed events (recordings.unpack_events), or None when none were stored."""
        if not 0 <= run_id <= SQLITE_MAX_ID:
            return None
        with self._reading():
            row = self.connection.execute("SELECT data FROM run_events WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None or not isinstance(row["data"], bytes) else bytes(row["data"])

    def _reading(self):
        return _Reading(self)

    @staticmethod
    def _record(row, with_steps: bool) -> RunRecord:
        damaged = []
        columns = row.keys()

        def text(name: str, default: str = "") -> str:
            value = row[name] if name in columns else default
            if isinstance(value, str):
                return value
            damaged.append(name)
            return default if value is None else str(value)

        def parsed(name: str):
            kind = JSON_COLUMNS[name]
            if name not in columns:  # list() leaves the bulky columns out: not damage
                return kind()
            try:
                value = json.loads(row[name])
            except (TypeError, ValueError, RecursionError):
                value = None
            if not isinstance(value, kind):
                damaged.append(name)
                return kind()
            return value

        error = row["error"]
        record = RunRecord(
            id=row["id"], created=text("created"), model=text("model"), policy=text("policy"),
            parameters=parsed("parameters"), prompt_sha256=text("prompt_sha256"),
            prompt_preview=text("prompt_preview"), status=text("status", "failed"), output=text("output"),
            figures=parsed("figures"), steps=parsed("steps") if with_steps else [],
            settings=parsed("settings"), error=error if error is None or isinstance(error, str) else str(error),
            memory=parsed("memory") if with_steps else [], kind=text("kind", "generate"),
        )
        record.damaged = damaged
        return record


class _Reading:
    """A read that turns SQLite's failures (a page damaged after the database was opened) into HistoryError."""

    def __init__(self, history: RunHistory):
        self.history = history

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if isinstance(error, sqlite3.DatabaseError):
            raise self.history._corrupt(error) from error
        return False


class _Writing:
    """A committed write transaction that turns SQLite's failures into HistoryError."""

    def __init__(self, history: RunHistory):
        self.history = history

    def __enter__(self):
        self.history.connection.__enter__()

    def __exit__(self, kind, error, trace):
        self.history.connection.__exit__(kind, error, trace)
        if isinstance(error, sqlite3.DatabaseError):  # locked, disk full, or a page damaged since the open
            raise HistoryError(f"could not write the run history {self.history.path}: {error}") from error
        return False
