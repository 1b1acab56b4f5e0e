"""Read-only salvage of a damaged SQLite trial store: the trials that can still be read, in a fresh copy.

A trial store hit by a disk fault, a truncated copy or an overwritten block is refused by
:func:`autoprune.store.check_sqlite_file`, and SQLite itself gives up at the first bad page of a table ("database
disk image is malformed"; a truncated file often loses the schema pages, and then nothing at all can be queried).
:func:`salvage_sqlite` therefore reads the pages itself, from a copy of the bytes (the committed frames of a
``-wal`` file applied), never through SQLite: not even SQLite's journal handling can touch the original. It walks
each of Optuna's tables from its root page, skips what cannot be decoded (a bad page loses only its own rows),
checks every row against the table's columns, and writes what survives into a new Optuna store of the current
schema, keeping every id.

A trial is *recovered* when its whole record is there: its row in the trials table, its study, and the user
attributes that :meth:`autoprune.store.TrialStore.finish` writes (:data:`autoprune.store.RECORD_ATTRS`: what
``autoprune report`` and ``autoprune export`` read). A trial missing any of that is *lost*. Optuna's own rows
(objective values, parameters, system attributes, intermediate values) are copied where readable; losses there are
named in :attr:`Salvage.notes`, since neither ``report`` nor ``export`` reads them. SQLite keeps no checksums: a
damaged byte inside a value that still decodes cannot be told from the original, except in the candidate, whose
stored key (a hash of its widths and bits) must match it, and in values that must parse (JSON, dates, Optuna's
names).

Salvage is refused with a :class:`SalvageError` that says why: the file is not SQLite, it is another program's
database, its schema belongs to another Optuna version, or no trial can be read from it.

This module and :mod:`autoprune.store` are the only ones that know Optuna's table names.
"""

from __future__ import annotations

import functools
import json
import shutil
import sqlite3
import struct
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from autoprune.errors import AutoPruneError
from autoprune.store import (
    COUNTED_STATES,
    MEMORY,
    RECORD_ATTRS,
    SQLITE_HEADER,
    TrialStore,
    check_sqlite_file,
    record_is_consistent,
)

#: Optuna's tables that a salvage copies, parents first (``alembic_version`` and ``version_info`` come with the new
#: store).
TABLES = ("studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
          "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
          "trial_intermediate_values", "trial_heartbeats")
#: A store larger than this is not salvaged just to count its readable trials for an error hint.
OFFER_LIMIT_BYTES = 64 * 2**20  # about 30 000 trials, 10 s

_STUDY_CHILDREN = ("study_directions", "study_user_attributes", "study_system_attributes")
_TRIAL_CHILDREN = ("trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
                   "trial_intermediate_values", "trial_heartbeats")
#: What an unreadable page of an Optuna-only table costs, in words.
_OPTUNA_ONLY = {
    "study_user_attributes": "searcher state",
    "study_system_attributes": "study system attributes",
    "trial_system_attributes": "constraints told to the samplers",
    "trial_params": "parameters",
    "trial_values": "objective values",
    "trial_intermediate_values": "intermediate values",
    "trial_heartbeats": "heartbeats",
}
#: Columns holding JSON, and columns holding one of Optuna's enum names: a row that does not parse is dropped.
_JSON_COLUMNS = {"study_user_attributes": "value_json", "study_system_attributes": "value_json",
                 "trial_user_attributes": "value_json", "trial_system_attributes": "value_json",
                 "trial_params": "distribution_json"}
_ENUMS = {
    ("trials", "state"): {"RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"},
    ("study_directions", "direction"): {"NOT_SET", "MINIMIZE", "MAXIMIZE"},
    ("trial_values", "value_type"): {"FINITE", "INF_POS", "INF_NEG"},
    ("trial_intermediate_values", "intermediate_value_type"): {"FINITE", "INF_POS", "INF_NEG", "NAN"},
}
_DATETIMES = {("trials", "datetime_start"), ("trials", "datetime_complete"), ("trial_heartbeats", "heartbeat")}
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")
#: Attributes :meth:`~autoprune.store.TrialStore.finish` writes when the campaign has a budget: required of a trial
#: when other trials of its study carry them.
_BUDGET_ATTRS = ("constraints", "feasible")
_SCHEMA_COLUMNS = 5  # sqlite_schema: type, name, tbl_name, rootpage, sql


class SalvageError(AutoPruneError):
    """Nothing can be salvaged from a trial store.

    Args:
        path: The store.
        reason: Why, in a few words (``"it is not a SQLite database (...)"``).
        hint: What the user can do instead.
    """

    def __init__(self, path: str | Path, reason: str, hint: str) -> None:
        self.reason = reason
        super().__init__(f"cannot salvage the trial store {path}: {reason}", hint=hint)


@dataclass(frozen=True)
class Salvage:
    """The outcome of :func:`salvage_sqlite`.

    Attributes:
        source: The damaged store (never written).
        path: The recovered copy: an Optuna SQLite store that :class:`~autoprune.store.TrialStore` opens.
        recovered: Trials copied with their whole record.
        lost: Trials known to have existed that could not be read whole (a lower bound: a lost page may hide
            trials that left no trace elsewhere).
        studies: Names of the recovered studies.
        trials: ``(study, trial number)`` of every recovered trial.
        damage: What is wrong with the source, in words; empty when it is intact.
        notes: Further losses that ``report`` and ``export`` do not depend on (Optuna-only rows, rebuilt names).
    """

    source: Path
    path: Path
    recovered: int
    lost: int
    studies: tuple[str, ...]
    trials: tuple[tuple[str, int], ...]
    damage: str
    notes: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """One line: the store, what is wrong with it, trials recovered and lost."""
        if not self.damage:
            return f"the trial store {self.source} is intact: all {self.recovered} trials were read"
        return (f"the trial store {self.source} is damaged ({self.damage}): {self.recovered} trials recovered, "
                f"{self.lost} lost; these results come from a salvaged copy (the damaged file was not changed)")

    def trial_lines(self) -> list[str]:
        """One line per recovered study: ``<study>: trials 0, 1, 3``."""
        by_study: dict[str, list[int]] = defaultdict(list)
        for study, number in self.trials:
            by_study[study].append(number)
        return [f"{study}: trials {', '.join(str(n) for n in sorted(numbers))}"
                for study, numbers in sorted(by_study.items())]


# ---------------------------------------------------------------------------------------------------------
# Reading pages without SQLite (https://www.sqlite.org/fileformat.html)


class _Bad(Exception):
    """A page, cell or record that cannot be decoded."""


def _u16(buf: bytes, pos: int) -> int:
    return int(struct.unpack_from(">H", buf, pos)[0])


def _u32(buf: bytes, pos: int) -> int:
    return int(struct.unpack_from(">I", buf, pos)[0])


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        b = buf[pos + i]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos + i + 1
    return (value << 8) | buf[pos + 8], pos + 9


def _wal_checksum(buf: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(buf) // 4}I", buf)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _record(payload: bytes, encoding: str) -> list[Any]:
    """The values of one SQLite record."""
    size, pos = _varint(payload, 0)
    if not 1 <= size <= len(payload):
        raise _Bad("record header")
    types = []
    while pos < size:
        t, pos = _varint(payload, pos)
        types.append(t)
    if pos != size:
        raise _Bad("record header")
    values: list[Any] = []
    body = size
    for t in types:
        n = (0, 1, 2, 3, 4, 6, 8, 8, 0, 0)[t] if t < 10 else (t - 12) // 2 if t >= 12 else -1
        if n < 0 or body + n > len(payload):
            raise _Bad("record body")
        raw = payload[body:body + n]
        if t == 0:
            values.append(None)
        elif t <= 6:
            values.append(int.from_bytes(raw, "big", signed=True))
        elif t == 7:
            values.append(struct.unpack(">d", raw)[0])
        elif t in (8, 9):
            values.append(t - 8)
        elif t % 2 == 0:
            values.append(bytes(raw))
        else:
            values.append(raw.decode(encoding))
        body += n
    if body != len(payload):
        raise _Bad("record length")
    return values


class _Pages:
    """The pages of a SQLite file, the committed frames of its write-ahead log applied.

    Raises:
        _Bad: If the header is unusable (page size, encoding).
    """

    def __init__(self, data: bytes, wal: bytes | None) -> None:
        size = _u16(data, 16)
        self.page_size = 65536 if size == 1 else size
        if self.page_size < 512 or self.page_size & (self.page_size - 1):
            raise _Bad(f"page size {size}")
        self.usable = self.page_size - data[20]
        encoding = {0: "utf-8", 1: "utf-8", 2: "utf-16-le", 3: "utf-16-be"}.get(_u32(data, 56))
        if self.usable < 480 or encoding is None:
            raise _Bad("header")
        self.encoding = encoding
        self.data = data
        self.in_file = len(data) // self.page_size
        declared = _u32(data, 28)
        valid = declared > 0 and _u32(data, 24) == _u32(data, 92)
        self.declared = declared if valid else self.in_file
        self.frames: dict[int, bytes] = {}
        committed = self._apply_wal(wal) if wal else None
        self.count = committed or self.declared

    def _apply_wal(self, wal: bytes) -> int | None:
        """Read the valid, committed frames of ``wal``; return the database size in pages after the last commit."""
        if len(wal) < 32:
            return None
        magic, _, page_size, _, salt1, salt2, c1, c2 = struct.unpack_from(">8I", wal, 0)
        if magic not in (0x377F0682, 0x377F0683) or page_size != self.page_size:
            return None
        big = bool(magic & 1)
        s0, s1 = _wal_checksum(wal[:24], 0, 0, big)
        if (s0, s1) != (c1, c2):
            return None
        pending: dict[int, bytes] = {}
        size = None
        frame = 24 + page_size
        for pos in range(32, len(wal) - frame + 1, frame):
            number, commit, fs1, fs2, fc1, fc2 = struct.unpack_from(">6I", wal, pos)
            if (fs1, fs2) != (salt1, salt2):
                break
            s0, s1 = _wal_checksum(wal[pos:pos + 8] + wal[pos + 24:pos + frame], s0, s1, big)
            if (s0, s1) != (fc1, fc2):
                break
            pending[number] = wal[pos + 24:pos + frame]
            if commit:
                self.frames.update(pending)
                pending = {}
                size = commit
        return size

    def page(self, number: int) -> bytes:
        if number in self.frames:
            return self.frames[number]
        if not 1 <= number <= self.count:
            raise _Bad(f"page {number} out of range")
        buf = self.data[(number - 1) * self.page_size:number * self.page_size]
        if len(buf) < self.page_size:
            raise _Bad(f"page {number} is past the end of the file")
        return buf

    def _btree_page(self, number: int) -> tuple[bool, bytes, list[int], int]:
        page = self.page(number)
        off = 100 if number == 1 else 0
        kind = page[off]
        if kind not in (0x05, 0x0D):  # table interior, table leaf
            raise _Bad(f"page {number} is not a table page")
        leaf = kind == 0x0D
        start = off + (8 if leaf else 12)
        end = start + 2 * _u16(page, off + 3)
        if end > self.usable:
            raise _Bad(f"page {number}: cell count")
        cells = [_u16(page, p) for p in range(start, end, 2)]
        if any(not end <= c < self.usable for c in cells):
            raise _Bad(f"page {number}: cell pointer")
        return leaf, page, cells, 0 if leaf else _u32(page, off + 8)

    def _cell(self, page: bytes, pos: int) -> tuple[int, bytes]:
        size, pos = _varint(page, pos)
        rowid, pos = _varint(page, pos)
        if rowid >= 1 << 63:
            rowid -= 1 << 64
        u = self.usable
        local = size
        if size > u - 35:
            m = (u - 12) * 32 // 255 - 23
            k = m + (size - m) % (u - 4)
            local = k if k <= u - 35 else m
        if pos + local + (4 if local < size else 0) > u:
            raise _Bad("cell overflows its page")
        parts = [page[pos:pos + local]]
        have, nxt, hops = local, _u32(page, pos + local) if local < size else 0, 0
        while have < size:
            hops += 1
            if nxt == 0 or hops > self.count:
                raise _Bad("overflow chain")
            over = self.page(nxt)
            take = min(u - 4, size - have)
            parts.append(over[4:4 + take])
            have += take
            nxt = _u32(over, 0)
        return rowid, b"".join(parts)

    def table(self, root: int) -> tuple[dict[int, list[Any]], int, int]:
        """Decoded records by rowid of the table b-tree at ``root``, the unreadable pages and the unreadable cells."""
        rows: dict[int, list[Any]] = {}
        bad_pages = bad_cells = 0
        seen: set[int] = set()
        stack = [root]
        while stack:
            number = stack.pop()
            if number in seen:  # a loop in the tree: damage
                bad_pages += 1
                continue
            seen.add(number)
            try:
                leaf, page, cells, right = self._btree_page(number)
                if not leaf:
                    stack.extend([_u32(page, c) for c in cells] + [right])
                    continue
            except (_Bad, IndexError, struct.error):
                bad_pages += 1
                continue
            for c in cells:
                try:
                    rowid, payload = self._cell(page, c)
                    rows[rowid] = _record(payload, self.encoding)
                except (_Bad, IndexError, struct.error, UnicodeDecodeError):
                    bad_cells += 1
        return rows, bad_pages, bad_cells


# ---------------------------------------------------------------------------------------------------------
# Tables: columns of the current schema, rows checked against them


def _affinity(declared: str) -> str:
    d = declared.upper()
    if "INT" in d:
        return "INTEGER"
    if any(s in d for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in d or not d:
        return "BLOB"
    if any(s in d for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    affinities: tuple[str, ...]
    notnull: tuple[bool, ...]
    alias: int | None  # the INTEGER PRIMARY KEY column, stored as the rowid

    @classmethod
    def read(cls, con: sqlite3.Connection, name: str) -> _Table:
        info = con.execute(f'PRAGMA table_info("{name}")').fetchall()  # cid, name, type, notnull, default, pk
        pks = [r for r in info if r[5]]
        alias = pks[0][0] if len(pks) == 1 and str(pks[0][2]).upper() == "INTEGER" else None
        return cls(name, tuple(r[1] for r in info), tuple(_affinity(str(r[2])) for r in info),
                   tuple(bool(r[3]) for r in info), alias)

    def signature(self) -> tuple[tuple[str, str, bool], ...]:
        return tuple(zip(self.columns, self.affinities, self.notnull, strict=True))

    @functools.cached_property
    def _checks(self) -> tuple[tuple[Any, bool, Any, Callable[[Any], bool] | None], ...]:
        """Per column: the Python types a value may have, NOT NULL, the allowed values, a parser."""
        kinds = {"INTEGER": int, "REAL": (int, float), "TEXT": str, "NUMERIC": (int, float, str), "BLOB": None}
        out = []
        for column, affinity, notnull in zip(self.columns, self.affinities, self.notnull, strict=True):
            parse = None
            if _JSON_COLUMNS.get(self.name) == column:
                parse = _distribution_ok if column == "distribution_json" else _json_ok
            elif (self.name, column) in _DATETIMES:
                parse = _datetime_ok
            out.append((kinds[affinity], notnull, _ENUMS.get((self.name, column)), parse))
        return tuple(out)

    def row(self, rowid: int, values: list[Any]) -> tuple[Any, ...] | None:
        """``values`` as a row of this table, or ``None`` when they cannot be one."""
        n = len(self.columns)
        if len(values) > n:
            return None
        vals = values + [None] * (n - len(values))
        if self.alias is not None:
            if vals[self.alias] is not None:
                return None
            vals[self.alias] = rowid
        for i, (kind, notnull, allowed, parse) in enumerate(self._checks):
            v = vals[i]
            if v is None:
                if notnull:
                    return None
                continue
            if kind is not None and (not isinstance(v, kind) or isinstance(v, bool)):
                return None
            if kind == (int, float):
                vals[i] = float(v)
            if (allowed is not None and v not in allowed) or (parse is not None and not parse(v)):
                return None
        return tuple(vals)


def _json_ok(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _distribution_ok(value: str) -> bool:
    try:
        optuna.distributions.json_to_distribution(value)
    except Exception:  # any failure is damage (json, Optuna's distribution classes)
        return False
    return True


def _datetime_ok(value: Any) -> bool:
    try:
        datetime.fromisoformat(str(value))
    except ValueError:
        return False
    return True


def _declared_signature(sql: str) -> tuple[tuple[str, str, bool], ...] | None:
    """The columns a ``CREATE TABLE`` statement declares (parsed by SQLite in memory), or ``None``."""
    if not sql.lstrip().upper().startswith("CREATE TABLE"):
        return None
    mem = sqlite3.connect(":memory:")
    try:
        mem.execute(sql)
        name = mem.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        return _Table.read(mem, name).signature()
    except sqlite3.Error:
        return None
    finally:
        mem.close()


@dataclass
class _Read:
    """What was read of one table."""

    rows: dict[int, tuple[Any, ...]]
    bad_pages: int = 0
    bad_rows: int = 0

    @property
    def damaged(self) -> bool:
        return bool(self.bad_pages or self.bad_rows)


# ---------------------------------------------------------------------------------------------------------
# Whole trial records


def _study_name(attrs: Mapping[str, Any]) -> str | None:
    """The name :meth:`~autoprune.store.TrialStore.study_name` gives a study with these user attributes."""
    campaign, searcher, seed = attrs.get("campaign"), attrs.get("searcher"), attrs.get("seed")
    if isinstance(campaign, str) and isinstance(searcher, str) and isinstance(seed, int):
        return f"{campaign}/{searcher}/seed{seed}"
    return None


def _attrs(read: _Read) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """``{owner id: {key: value}}`` of a user attribute table (the owner is a study or a trial), and the owners
    with two different values for one key (one of them damaged, and no telling which)."""
    out: dict[int, dict[str, Any]] = defaultdict(dict)
    conflicts: set[int] = set()
    for row in read.rows.values():
        owner_id, key, value = row[1], row[2], row[3]
        if owner_id is not None and key is not None and value is not None:
            attrs, loaded = out[int(owner_id)], json.loads(value)
            if str(key) in attrs and attrs[str(key)] != loaded:
                conflicts.add(int(owner_id))
            attrs[str(key)] = loaded
    return out, conflicts


def _complete(state: str, attrs: Mapping[str, Any], budget_attrs: set[str]) -> bool:
    """Whether a trial in Optuna state ``state`` with these user attributes has its whole record."""
    if state not in _FINISHED:
        return True  # running or waiting: its row is its record
    ours = attrs.get("state")
    if ours in COUNTED_STATES:
        return set(RECORD_ATTRS) <= set(attrs) and budget_attrs <= set(attrs) and record_is_consistent(attrs)
    return ours == "interrupted" and isinstance(attrs.get("reason"), str)


# ---------------------------------------------------------------------------------------------------------
# Salvage


@functools.cache
def _empty_store() -> tuple[bytes, str, tuple[str, ...]]:
    """The bytes of a new, empty Optuna SQLite store, its schema version and every version this Optuna knows
    (made once per process: creating the schema takes Optuna most of a second)."""
    with tempfile.TemporaryDirectory(prefix="autoprune-salvage-") as tmp:
        path = Path(tmp) / "empty.db"
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        head, known = storage.get_head_version(), tuple(storage.get_all_versions())
        storage.engine.dispose()
        return path.read_bytes(), head, known


def _new_store(dest: Path) -> tuple[str, list[str], dict[str, _Table], dict[str, int]]:
    """Create an empty Optuna store at ``dest``: its schema version, the versions this Optuna knows, its tables and
    their root pages (the layout Optuna gives a new store)."""
    data, head, known = _empty_store()
    dest.write_bytes(data)
    con = sqlite3.connect(dest)
    try:
        roots = {str(n): int(r) for n, r in con.execute("SELECT name, rootpage FROM sqlite_master WHERE type='table'")}
        tables = {name: _Table.read(con, name) for name in (*TABLES, "alembic_version") if name in roots}
    finally:
        con.close()
    return head, list(known), tables, roots


def _quick_check(copy: Path) -> bool:
    try:
        check_sqlite_file(copy)
    except AutoPruneError:
        return False
    return True


class _Salvager:
    """One salvage: find the source's tables, read them, decide what is whole, write it to the new store."""

    def __init__(self, source: Path, pages: _Pages, dest: Path) -> None:
        self.source = source
        self.pages = pages
        self.dest = dest
        self.head, self.known, self.tables, self.ref_roots = _new_store(dest)
        self.notes: list[str] = []
        self.schema: dict[str, tuple[int, str]] = {}
        self.roots_in_use: set[int] = set()
        self.skipped: set[str] = set()
        self.bad_pages = 0
        self.bad_rows = 0

    def read_schema(self) -> None:
        """The source's own schema (``sqlite_schema`` on page 1): ``{table: (root page, sql)}``; refuses another
        program's database."""
        rows, bad_pages, bad_cells = self.pages.table(1)
        self.bad_pages += bad_pages
        self.bad_rows += bad_cells
        for values in rows.values():
            if len(values) != _SCHEMA_COLUMNS or not isinstance(values[3], int):
                continue
            kind, name, _, root, sql = values
            self.roots_in_use.add(root)
            if kind == "table" and isinstance(name, str):
                self.schema[name] = (root, sql if isinstance(sql, str) else "")
        names = set(self.schema)
        if names and not names & {*TABLES, "alembic_version", "version_info"}:
            shown = ", ".join(sorted(names)[:6])
            raise SalvageError(self.source, f"it is another program's database (tables: {shown}), not an Optuna "
                               "trial store", hint="autoprune reads only the trial stores it wrote; point the "
                               "command at the campaign's own trials.db")
        if not names and not (bad_pages or bad_cells):
            raise SalvageError(self.source, "it holds no tables", hint="there is nothing to salvage")

    def read(self, name: str) -> _Read:
        """The rows of Optuna table ``name`` that fit its columns."""
        table = self.tables[name]
        if name in self.skipped:
            return _Read({})
        if name in self.schema:
            root, guessed = self.schema[name][0], False
        elif self.ref_roots[name] in self.roots_in_use:
            return _Read({})  # the store has no such table, and the page Optuna would give it is another's
        else:
            root, guessed = self.ref_roots[name], True  # the schema page naming it is lost: where Optuna puts it
        records, bad_pages, bad_cells = self.pages.table(root)
        out = _Read({}, bad_pages, bad_cells)
        for rowid, values in records.items():
            row = table.row(rowid, values)
            if row is None:
                out.bad_rows += 1
            else:
                out.rows[rowid] = row
        if guessed and out.bad_rows > len(out.rows):  # not this table's page after all
            return _Read({}, out.bad_pages + 1, 0)
        self.bad_pages += out.bad_pages
        self.bad_rows += out.bad_rows
        return out

    def check_version(self) -> None:
        """Refuse a schema of another Optuna version; when the version cannot be read, skip the tables whose
        declared columns differ from this Optuna's."""
        found = [str(r[0]) for r in self.read("alembic_version").rows.values()]
        if found and found[0] == self.head:
            return
        if found and found[0] in self.known:
            raise SalvageError(self.source, f"its schema is an older Optuna's ({found[0]}; the installed Optuna "
                               f"{optuna.__version__} uses {self.head})",
                               hint="open it with the Optuna version that wrote it")
        if found:
            raise SalvageError(self.source, f"it was written with a newer Optuna schema ({found[0]}) than the "
                               f"installed Optuna {optuna.__version__} knows (its newest is {self.head})",
                               hint="install the Optuna version that wrote the store (e.g. pip install -U optuna) "
                               "and run the command again; autoprune never converts a damaged store")
        self.notes.append("the schema version could not be read; the tables' columns were checked instead")
        for name in TABLES:
            if name in self.schema:
                declared = _declared_signature(self.schema[name][1])
                if declared is not None and declared != self.tables[name].signature():
                    self.skipped.add(name)
                    self.notes.append(f"table {name} declares other columns than this Optuna's and was not read")

    def studies(self, reads: Mapping[str, _Read]) -> dict[int, str]:
        """``{study id: name}``: read, or named again from the study's attributes when its row is lost."""
        studies: dict[int, str] = {}
        for r in reads["studies"].rows.values():
            if str(r[1]) not in studies.values():  # a name twice: damage; the first row keeps it
                studies[int(r[0])] = str(r[1])
        study_attrs, _ = _attrs(reads["study_user_attributes"])
        sid_col = self.tables["trials"].columns.index("study_id")
        referenced = {r[sid_col] for r in reads["trials"].rows.values() if r[sid_col] is not None}
        for sid in sorted(referenced - set(studies)):
            name = _study_name(study_attrs.get(sid, {}))
            if name is not None and name not in studies.values():
                studies[sid] = name
                self.notes.append(f"the name of study {name} was rebuilt from its attributes")
        return studies

    def trials(self, reads: Mapping[str, _Read], studies: Mapping[int, str]) -> tuple[set[int], int]:
        """The ids of the trials whose record is whole, and how many trials are known to be lost."""
        trials = reads["trials"].rows
        trial_attrs, conflicts = _attrs(reads["trial_user_attributes"])
        col = {c: i for i, c in enumerate(self.tables["trials"].columns)}
        budget_keys: dict[int, set[str]] = defaultdict(set)
        numbers: dict[int, set[int]] = defaultdict(set)
        for tid, row in trials.items():
            budget_keys[row[col["study_id"]]] |= set(_BUDGET_ATTRS) & set(trial_attrs.get(tid, {}))
            if row[col["number"]] is not None:
                numbers[row[col["study_id"]]].add(int(row[col["number"]]))
        kept = {tid for tid, row in trials.items() if row[col["study_id"]] in studies and tid not in conflicts
                and _complete(row[col["state"]], trial_attrs.get(tid, {}), budget_keys[row[col["study_id"]]])}
        known = set(trials)
        for name in _TRIAL_CHILDREN:
            i = self.tables[name].columns.index("trial_id")
            known |= {int(r[i]) for r in reads[name].rows.values() if r[i] is not None}
        gaps = sum(max(seen) + 1 - len(seen) for seen in numbers.values())  # numbers missing in a study
        return kept, len(trials) - len(kept) + max(len(known - set(trials)), gaps)

    def rows(self, reads: Mapping[str, _Read], studies: Mapping[int, str], kept: set[int]
             ) -> dict[str, list[tuple[Any, ...]]]:
        """The rows to write: the studies, the kept trials, and their rows in the other tables."""
        out: dict[str, list[tuple[Any, ...]]] = {
            "studies": [(sid, studies[sid]) for sid in sorted(studies)],
            "trials": [reads["trials"].rows[t] for t in sorted(kept)],
        }
        for name in _STUDY_CHILDREN:
            i = self.tables[name].columns.index("study_id")
            out[name] = [r for r in reads[name].rows.values() if r[i] in studies]
        for name in _TRIAL_CHILDREN:
            i = self.tables[name].columns.index("trial_id")
            out[name] = [r for r in reads[name].rows.values() if r[i] in kept]
        directions = self.tables["study_directions"].columns
        sid_col = directions.index("study_id")
        for sid in sorted(set(studies) - {r[sid_col] for r in out["study_directions"]}):
            self.notes.append(f"the optimisation direction of study {studies[sid]} could not be read; it is "
                              "recorded as maximize (report and export do not use it)")
            row = {"study_direction_id": None, "direction": "MAXIMIZE", "study_id": sid, "objective": 0}
            out["study_directions"].append(tuple(row[c] for c in directions))
        unread = [what for name, what in _OPTUNA_ONLY.items() if reads[name].damaged]
        if unread:
            self.notes.append(f"some rows only Optuna uses could not be read ({', '.join(unread)}); report and "
                              "export do not read them")
        valued = {r[1] for r in out["trial_values"]}
        state = self.tables["trials"].columns.index("state")
        missing = [r for r in out["trials"] if r[state] == "COMPLETE" and r[0] not in valued]
        if missing and not reads["trial_values"].damaged:
            self.notes.append(f"{len(missing)} complete trial(s) have no objective values told to Optuna")
        return out

    def damage(self, lost: int, quick_ok: bool) -> str:
        """What is wrong with the source, in words (empty when nothing is)."""
        found = []
        if self.pages.in_file < self.pages.declared:
            found.append(f"the file ends after {self.pages.in_file} of its {self.pages.declared} pages")
        if self.bad_pages:
            found.append(f"{self.bad_pages} unreadable page(s)")
        if self.bad_rows:
            found.append(f"{self.bad_rows} unreadable row(s)")
        if lost and not found:
            found.append(f"{lost} trial(s) without a whole record")
        if not quick_ok and not found:
            found.append("SQLite's integrity check fails")
        return "; ".join(found)

    def run(self, quick_ok: bool) -> Salvage:
        """Read, decide, write, describe."""
        self.read_schema()
        self.check_version()
        reads = {name: self.read(name) for name in TABLES}
        studies = self.studies(reads)
        kept, lost = self.trials(reads, studies)
        rows = self.rows(reads, studies, kept)
        damage = self.damage(lost, quick_ok)
        if damage and not kept:
            lost_text = f"; {lost} trial(s) lost" if lost else ""
            raise SalvageError(self.source, f"no trial can be read from it ({damage}{lost_text})",
                               hint="restore it from a backup, or move it aside to start the campaign's store "
                               "afresh")
        _write(self.dest, self.tables, rows)
        col = {c: i for i, c in enumerate(self.tables["trials"].columns)}
        listed = sorted((studies[r[col["study_id"]]], int(r[col["number"]] or 0)) for r in rows["trials"])
        return Salvage(source=self.source, path=self.dest, recovered=len(kept), lost=lost,
                       studies=tuple(sorted(studies.values())), trials=tuple(listed), damage=damage,
                       notes=tuple(self.notes))


def _check_source(path: Path, data: bytes, wal: bytes | None) -> _Pages:
    if not data:
        raise SalvageError(path, "it is empty", hint="there is nothing to salvage; remove it to start afresh")
    if data[:len(SQLITE_HEADER)] != SQLITE_HEADER:
        raise SalvageError(path, f"it is not a SQLite database (its first bytes are {data[:16]!r})",
                           hint="restore it from a backup; nothing in it can be read as trials")
    try:
        return _Pages(data, wal)
    except (_Bad, IndexError, struct.error) as exc:
        raise SalvageError(path, f"its SQLite header is damaged ({exc})",
                           hint="restore it from a backup; without the header no page can be located") from None


def salvage_sqlite(path: str | Path, dest_dir: str | Path) -> Salvage:
    """Recover the readable trials of a (damaged) SQLite trial store into a new store in ``dest_dir``.

    The source is only read: its bytes (and its ``-wal``/``-shm`` files) are copied into ``dest_dir`` and all
    reading is done on the copy. ``dest_dir`` gets ``<name>.salvaged.db``; the copies are removed.

    Args:
        path: The trial store (a SQLite file).
        dest_dir: Where the recovered store is written; not the store's own directory.

    Returns:
        The :class:`Salvage`; ``damage`` is empty when the store turned out intact.

    Raises:
        SalvageError: The file is not SQLite or not an Optuna trial store, its schema is another Optuna's, or no
            trial can be read from it.
        AutoPruneError: ``dest_dir`` is the store's directory or already holds a salvaged copy.
    """
    source = Path(path)
    out_dir = Path(dest_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.resolve() == source.resolve().parent:
        raise AutoPruneError(f"salvage of {source} would write next to it",
                             hint="salvage into another directory: the damaged store's directory is left as it is")
    dest = out_dir / f"{source.stem}.salvaged.db"
    if dest.exists():
        raise AutoPruneError(f"{dest} already exists", hint="salvage into an empty directory")
    with tempfile.TemporaryDirectory(prefix=".autoprune-salvage-", dir=out_dir) as tmp:
        copy = Path(tmp) / "source.db"
        try:
            shutil.copyfile(source, copy)
            for extra in ("-wal", "-shm"):
                if Path(f"{source}{extra}").is_file():
                    shutil.copyfile(f"{source}{extra}", f"{copy}{extra}")
        except OSError as exc:
            raise SalvageError(source, f"it cannot be read ({exc.strerror or exc})",
                               hint="check that the file exists and is readable") from None
        wal_path = Path(f"{copy}-wal")
        pages = _check_source(source, copy.read_bytes(), wal_path.read_bytes() if wal_path.is_file() else None)
        quick_ok = _quick_check(copy)
        try:
            return _Salvager(source, pages, dest).run(quick_ok)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise


def _write(dest: Path, tables: Mapping[str, _Table], rows: Mapping[str, list[tuple[Any, ...]]]) -> None:
    """Insert ``rows`` into the new store at ``dest`` (ids kept) in one transaction, then check it.

    A row that would repeat a unique value (damage can duplicate one) is skipped.
    """
    con = sqlite3.connect(dest)
    try:
        with con:
            for name in TABLES:
                cols = tables[name].columns
                quoted = ", ".join(f'"{c}"' for c in cols)
                con.executemany(f'INSERT OR IGNORE INTO "{name}" ({quoted}) VALUES ({", ".join("?" * len(cols))})',
                                rows.get(name, []))
        problems = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
    finally:
        con.close()
    if problems != ["ok"]:  # a new file written by SQLite itself: a bug, not the user's damage
        raise RuntimeError(f"the salvaged store {dest} fails SQLite's integrity check: {problems[:3]}")


# ---------------------------------------------------------------------------------------------------------
# For the commands


def sqlite_path(location: str) -> Path | None:
    """The file of a store location (a path or ``sqlite:///`` URL); ``None`` for a server URL or memory."""
    if location.startswith("sqlite:///"):
        return Path(location[len("sqlite:///"):])
    if "://" in location or location == MEMORY:
        return None
    return Path(location)


def salvage_offer(path: str | Path, command: str) -> str | None:
    """The hint for a SQLite store that failed to open: how many trials ``command`` (with ``--salvage``) would
    read, or why salvage is not possible; ``None`` when the file is intact (the failure is about something else).

    Counting salvages into a temporary directory (removed); a store over :data:`OFFER_LIMIT_BYTES` is not counted.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        return None
    aside = f"to search on, restore {p.name} from a backup or move it aside (mv {p.name} {p.name}.damaged)"
    if size > OFFER_LIMIT_BYTES:
        return f"`{command}` reads the trials that can still be read (read-only; the file is not changed); {aside}"
    with tempfile.TemporaryDirectory(prefix="autoprune-salvage-") as tmp:
        try:
            found = salvage_sqlite(p, tmp)
        except SalvageError as why:
            return f"read-only salvage (--salvage) is not possible: {why.reason}; {why.hint}"
    if not found.damage:
        return None
    return (f"{found.recovered} of {found.recovered + found.lost} trials can still be read: run `{command}` "
            f"(read-only; the file is not changed); {aside}")


def load_trials(open_store: Callable[[], TrialStore], location: str, *, campaign: str, salvage: bool,
                command: str) -> tuple[pd.DataFrame, Salvage | None]:
    """The campaign's trial table (:meth:`~autoprune.store.TrialStore.to_dataframe`), read from a salvaged copy
    when the SQLite store is damaged and ``salvage`` is set.

    Args:
        open_store: Opens the campaign's store (raising :class:`AutoPruneError` when it is damaged).
        location: The store's location (path or URL).
        campaign: The campaign name.
        salvage: Read a damaged SQLite store through :func:`salvage_sqlite`, into a temporary directory that is
            removed before returning (:attr:`Salvage.path` then no longer exists).
        command: The command line that salvages, offered in the hint when ``salvage`` is not set.

    Returns:
        The trial table and, when it comes from a salvaged copy, the :class:`Salvage`.

    Raises:
        AutoPruneError: The store cannot be opened; for a damaged SQLite file the hint offers ``command`` (with the
            number of readable trials) or says why salvage is not possible. With ``salvage``: why it is not.
    """
    try:
        store = open_store()
        return store.to_dataframe(), None
    except AutoPruneError as exc:
        path = sqlite_path(location)
        if path is None or not path.is_file():
            raise
        if not salvage:
            offer = salvage_offer(path, command)
            if offer is None:
                raise
            raise AutoPruneError(exc.message, hint=offer) from exc
        with tempfile.TemporaryDirectory(prefix="autoprune-salvage-") as tmp:
            try:
                found = salvage_sqlite(path, tmp)
            except SalvageError as why:
                raise why from exc
            if not found.damage:
                raise
            copy = TrialStore(found.path, campaign=campaign, artifact_root=Path(tmp) / "artifacts")
            try:
                df = copy.to_dataframe()
            finally:
                engine = getattr(copy.storage, "engine", None)
                if engine is not None:
                    engine.dispose()
        return df, found
