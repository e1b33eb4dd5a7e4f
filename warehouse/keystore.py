"""Per-subject keys, pseudonymization, and crypto-shredding.

- A raw user identifier becomes a `subject_id` by a keyed HMAC (the *pepper*), so the warehouse never
  holds the identifier itself in the clear and the same person always maps to the same subject.
- Each subject gets a random 256-bit key for AES-256-GCM encryption of their personal fields. The
  event id is the associated data, so a ciphertext cannot be moved to another event.
- Keys live in SQLite (`keys.db`) with `PRAGMA secure_delete=ON` and a rollback journal, so deleting a
  key overwrites its bytes in the database file; the journal file is removed at commit. Shredding a
  subject deletes the key and leaves a tombstone (subject id, time, request id) that stops the key from
  being re-created by a late replay.

The pepper is stored in the same keystore (table `secrets`). Keys are wrapped with nothing else: the
keystore file is the secret, and it is kept apart from the warehouse so a copy of the warehouse alone
holds only ciphertext.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
_SQL_CHUNK = 900  # below SQLite's host-parameter limit


class KeyShreddedError(LookupError):
    """The subject's key was destroyed; their personal data can no longer be read or written."""


class SubjectKey:
    """A subject's key with the operations the warehouse needs."""

    __slots__ = ("_aead", "subject_id")

    def __init__(self, subject_id: str, material: bytes) -> None:
        self.subject_id = subject_id
        self._aead = AESGCM(material)

    def encrypt(self, plaintext: bytes, aad: bytes, nonce: bytes | None = None) -> bytes:
        """AES-256-GCM; returns nonce + ciphertext + tag. `aad` binds the ciphertext to its event.

        Callers encrypting many rows pass nonces from `NonceSequence` (a random 64-bit prefix per
        batch and a 32-bit counter, NIST SP 800-38D 8.2.1); by default the nonce is random.
        """
        nonce = nonce or os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


class NonceSequence:
    """Unique 96-bit GCM nonces for one batch: 64 random bits + a 32-bit counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._next = 0

    def __call__(self) -> bytes:
        n = self._next
        if n >= 1 << 32:
            self._prefix, n = os.urandom(8), 0
        self._next = n + 1
        return self._prefix + n.to_bytes(4, "big")


class KeyStore:
    """SQLite keystore whose deletions leave no bytes behind (secure_delete, rollback journal)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._conn()
        con.executescript(
                """
            CREATE TABLE IF NOT EXISTS subject_keys (
                subject_id TEXT PRIMARY KEY, material BLOB NOT NULL, created_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS tombstones (
                subject_id TEXT PRIMARY KEY, shredded_at TEXT NOT NULL, request_id TEXT);
            CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
            """
        )
        con.execute("INSERT OR IGNORE INTO secrets(name, value) VALUES ('pepper', ?)", (os.urandom(32),))
        self._pepper = con.execute("SELECT value FROM secrets WHERE name='pepper'").fetchone()[0]

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA secure_delete=ON")
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return _Tx(con)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # --- pseudonymization ---------------------------------------------------------------------

    def pseudonymize(self, user_id: str) -> str:
        """The subject id of a raw user identifier (keyed HMAC-SHA256, 128 bits, hex)."""
        return hmac.digest(self._pepper, user_id.encode(), "sha256")[:16].hex()

    def pseudonymize_many(self, user_ids: Iterable[str]) -> dict[str, str]:
        pepper = self._pepper
        return {u: hmac.digest(pepper, u.encode(), "sha256")[:16].hex() for u in user_ids}

    # --- keys ---------------------------------------------------------------------------------

    def keys_for(self, subject_ids: Iterable[str], *, create: bool = True) -> dict[str, SubjectKey]:
        """Keys of these subjects, creating missing ones; shredded subjects are absent from the result.

        Creation is race-free across processes: the lookup and the inserts are one IMMEDIATE
        transaction (SQLite's write lock), so no other process can create the same key in between.
        """
        wanted = sorted(set(subject_ids))
        con = self._conn()
        with con:
            found: dict[str, bytes] = dict(
                self._select_in(con, "SELECT subject_id, material FROM subject_keys", wanted, pairs=True)
            )
            missing = [s for s in wanted if s not in found]
            if create and missing:
                shredded = self._select_in(con, "SELECT subject_id FROM tombstones", missing)
                now = datetime.now(UTC).isoformat()
                created = [(s, os.urandom(KEY_BYTES), now) for s in missing if s not in shredded]
                con.executemany("INSERT INTO subject_keys(subject_id, material, created_at) VALUES (?,?,?)", created)
                found.update((s, material) for s, material, _ in created)
        return {s: SubjectKey(s, m) for s, m in found.items()}

    def key_for(self, subject_id: str, *, create: bool = False) -> SubjectKey:
        keys = self.keys_for([subject_id], create=create)
        if subject_id not in keys:
            raise KeyShreddedError(
                f"subject {subject_id}: no key ({'shredded' if self.is_shredded(subject_id) else 'unknown'})"
            )
        return keys[subject_id]

    def is_shredded(self, subject_id: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM tombstones WHERE subject_id=?", (subject_id,)).fetchone()
        return row is not None

    def shredded_subjects(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT subject_id FROM tombstones").fetchall()}

    def shred(self, subject_id: str, request_id: str | None = None) -> bool:
        """Destroy the subject's key (its bytes are overwritten on disk) and leave a tombstone.

        Returns True if a key existed. Idempotent.
        """
        con = self._conn()
        with con:
            cur = con.execute("DELETE FROM subject_keys WHERE subject_id=?", (subject_id,))
            con.execute(
                "INSERT OR IGNORE INTO tombstones(subject_id, shredded_at, request_id) VALUES (?,?,?)",
                (subject_id, datetime.now(UTC).isoformat(), request_id),
            )
            existed = cur.rowcount > 0
        # secure_delete zeroes the freed cells; the rollback journal is deleted at commit.
        return existed

    @staticmethod
    def _select_in(con, sql: str, ids: list[str], *, pairs: bool = False):
        rows = []
        for i in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows.extend(con.execute(f"{sql} WHERE subject_id IN ({marks})", chunk).fetchall())
        return rows if pairs else {r[0] for r in rows}


class _Tx:
    """A sqlite3 connection in autocommit mode whose `with` block is one IMMEDIATE transaction."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    def __getattr__(self, name: str):
        return getattr(self._con, name)

    def __enter__(self) -> sqlite3.Connection:
        self._con.execute("BEGIN IMMEDIATE")
        return self._con

    def __exit__(self, exc_type, exc, tb) -> None:
        self._con.execute("ROLLBACK" if exc_type else "COMMIT")
