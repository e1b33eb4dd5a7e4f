"""Projections: DuckDB tables folded from the event log, caught up incrementally, rebuildable.

Each projection is a list of SQL statements over the events in a position range `(?, ?]`; catching
up runs them and moves the projection's tracking position in the same transaction, so a crash leaves
either both or neither. Every statement is order-insensitive within a range (inserts of one row per
event, or commutative upserts such as min/max/sum), so folding the log in one range or in many gives
the same rows: `rebuild()` and incremental catch-up agree byte for byte (`canonical_hash`).

No projection holds plaintext personal data: text stays encrypted in the events table, so erasure
by key shredding needs no rewrite here.

Tables:
    proj_interactions   one row per InteractionLogged
    proj_feedback       one row per FeedbackGiven
    proj_subjects       one row per subject: counts, first/last position, erasure state
    proj_dsr_requests   one row per data-subject request: kind, status, times
Views:
    interaction_feedback        interactions joined with their feedback totals (always current)
    feedback_by_model_version   the canary view: feedback rates and latency per answering model version
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import duckdb
import orjson

if TYPE_CHECKING:
    from warehouse.store import EventStore

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS projection_positions (name VARCHAR PRIMARY KEY, position BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS proj_interactions (
    position BIGINT, event_id UUID, request_id VARCHAR, subject_id VARCHAR, session_id VARCHAR,
    model_version VARCHAR, occurred_at TIMESTAMPTZ, latency_ms DOUBLE, prompt_tokens BIGINT,
    completion_tokens BIGINT, status VARCHAR, labels VARCHAR[]);
CREATE TABLE IF NOT EXISTS proj_feedback (
    position BIGINT, event_id UUID, feedback_id VARCHAR, request_id VARCHAR, subject_id VARCHAR,
    occurred_at TIMESTAMPTZ, thumbs INTEGER, rating INTEGER, has_correction BOOLEAN, labels VARCHAR[]);
CREATE TABLE IF NOT EXISTS proj_subjects (
    subject_id VARCHAR PRIMARY KEY, first_position BIGINT, last_position BIGINT, events BIGINT,
    interactions BIGINT, feedback BIGINT, erasure_requested_position BIGINT, shredded_position BIGINT);
CREATE TABLE IF NOT EXISTS proj_dsr_requests (
    request_id VARCHAR PRIMARY KEY, subject_id VARCHAR, kind VARCHAR, requested_position BIGINT,
    requested_at TIMESTAMPTZ, completed_position BIGINT, completed_at TIMESTAMPTZ);
CREATE OR REPLACE VIEW interaction_feedback AS
SELECT i.*,
       coalesce(f.thumbs_up, 0) AS thumbs_up, coalesce(f.thumbs_down, 0) AS thumbs_down,
       f.mean_rating, coalesce(f.corrections, 0) AS corrections
FROM proj_interactions i
LEFT JOIN (
    SELECT request_id, count(*) FILTER (thumbs = 1) AS thumbs_up, count(*) FILTER (thumbs = -1) AS thumbs_down,
           avg(rating) AS mean_rating, count(*) FILTER (has_correction) AS corrections
    FROM proj_feedback GROUP BY request_id
) f USING (request_id);
-- Canary view: online feedback rates per model version that answered (champion vs challenger).
CREATE OR REPLACE VIEW feedback_by_model_version AS
SELECT model_version, count(*) AS interactions,
       count(*) FILTER (thumbs_up + thumbs_down > 0) AS rated,
       sum(thumbs_up) AS thumbs_up, sum(thumbs_down) AS thumbs_down,
       sum(thumbs_up) / nullif(sum(thumbs_up) + sum(thumbs_down), 0) AS thumbs_up_rate,
       sum(thumbs_down) / nullif(count(*), 0) AS thumbs_down_per_interaction,
       avg(mean_rating) AS mean_rating, sum(corrections) AS corrections,
       quantile_cont(latency_ms, 0.5) AS latency_p50_ms, quantile_cont(latency_ms, 0.95) AS latency_p95_ms
FROM interaction_feedback GROUP BY model_version;
"""

# name → statements, each parameterized by (after, upto) positions.
PROJECTIONS: dict[str, list[str]] = {
    "interactions": [
        """
        INSERT INTO proj_interactions
        SELECT position, event_id, payload->>'request_id', subject_id, payload->>'session_id',
               payload->>'model_version', occurred_at, (payload->>'latency_ms')::DOUBLE,
               (payload->>'prompt_tokens')::BIGINT, (payload->>'completion_tokens')::BIGINT,
               payload->>'status', (payload->'labels')::VARCHAR[]
        FROM events WHERE position > $after AND position <= $upto AND type = 'InteractionLogged'
        """
    ],
    "feedback": [
        """
        INSERT INTO proj_feedback
        SELECT position, event_id, payload->>'feedback_id', payload->>'request_id', subject_id, occurred_at,
               (payload->>'thumbs')::INTEGER, (payload->>'rating')::INTEGER,
               coalesce((payload->>'has_correction')::BOOLEAN, false), (payload->'labels')::VARCHAR[]
        FROM events WHERE position > $after AND position <= $upto AND type = 'FeedbackGiven'
        """
    ],
    "subjects": [
        """
        INSERT INTO proj_subjects
        SELECT subject_id, min(position), max(position), count(*),
               count(*) FILTER (type = 'InteractionLogged'), count(*) FILTER (type = 'FeedbackGiven'),
               min(position) FILTER (type = 'ErasureRequested'), min(position) FILTER (type = 'SubjectShredded')
        FROM events WHERE position > $after AND position <= $upto AND subject_id IS NOT NULL
        GROUP BY subject_id
        ON CONFLICT (subject_id) DO UPDATE SET
            first_position = least(proj_subjects.first_position, excluded.first_position),
            last_position = greatest(proj_subjects.last_position, excluded.last_position),
            events = proj_subjects.events + excluded.events,
            interactions = proj_subjects.interactions + excluded.interactions,
            feedback = proj_subjects.feedback + excluded.feedback,
            erasure_requested_position = coalesce(
                least(proj_subjects.erasure_requested_position, excluded.erasure_requested_position),
                proj_subjects.erasure_requested_position, excluded.erasure_requested_position),
            shredded_position = coalesce(
                least(proj_subjects.shredded_position, excluded.shredded_position),
                proj_subjects.shredded_position, excluded.shredded_position)
        """
    ],
    "dsr_requests": [
        """
        INSERT INTO proj_dsr_requests
        SELECT payload->>'request_id', subject_id,
               CASE type WHEN 'ErasureRequested' THEN 'erasure' ELSE 'access' END,
               position, occurred_at, NULL, NULL
        FROM events
        WHERE position > $after AND position <= $upto AND type IN ('ErasureRequested', 'AccessRequested')
        ON CONFLICT (request_id) DO NOTHING
        """,
        """
        UPDATE proj_dsr_requests r SET completed_position = c.position, completed_at = c.occurred_at
        FROM (SELECT payload->>'request_id' AS request_id, min(position) AS position, min(occurred_at) AS occurred_at
              FROM events WHERE position > $after AND position <= $upto AND type = 'ErasureCompleted'
              GROUP BY 1) c
        WHERE r.request_id = c.request_id AND r.completed_position IS NULL
        """,
    ],
}

TABLES = {
    "interactions": ("proj_interactions", "position"),
    "feedback": ("proj_feedback", "position"),
    "subjects": ("proj_subjects", "subject_id"),
    "dsr_requests": ("proj_dsr_requests", "request_id"),
}


def ensure_projection_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(TABLES_SQL)
    for name in PROJECTIONS:
        con.execute("INSERT OR IGNORE INTO projection_positions VALUES (?, 0)", [name])


def catch_up(store: EventStore, *, step: int = 2_000_000) -> dict[str, int]:
    """Fold every event not yet applied into each projection; returns {name: events applied}.

    Works in position steps so a long backlog never needs one huge transaction; each step commits
    the projection rows and the tracking position together.
    """
    applied: dict[str, int] = {}
    with store.connect() as con:
        head = con.execute("SELECT value FROM store_meta WHERE key='head'").fetchall()[0][0]
        for name, statements in PROJECTIONS.items():
            pos = con.execute("SELECT position FROM projection_positions WHERE name=?", [name]).fetchall()[0][0]
            applied[name] = head - pos
            while pos < head:
                upto = min(head, pos + step)
                con.execute("BEGIN")
                try:
                    for sql in statements:
                        con.execute(sql, {"after": pos, "upto": upto})
                    con.execute("UPDATE projection_positions SET position=? WHERE name=?", [upto, name])
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                pos = upto
    return applied


def rebuild(store: EventStore) -> dict[str, int]:
    """Drop every projection and fold the whole log again."""
    with store.connect() as con:
        con.execute("BEGIN")
        for table, _ in TABLES.values():
            con.execute(f"DELETE FROM {table}")
        con.execute("UPDATE projection_positions SET position = 0")
        con.execute("COMMIT")
        return catch_up(store)


def positions(store: EventStore) -> dict[str, int]:
    with store.connect() as con:
        return dict(con.execute("SELECT name, position FROM projection_positions ORDER BY name").fetchall())


def canonical_hash(store: EventStore) -> str:
    """SHA-256 over every projection's rows in key order: equal hashes mean identical state."""
    h = hashlib.sha256()
    with store.connect() as con:
        for name, (table, key) in sorted(TABLES.items()):
            h.update(name.encode())
            rows = con.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
            for row in rows:
                h.update(orjson.dumps([str(v) if v is not None else None for v in row]))
    return h.hexdigest()


def feedback_by_model(store: EventStore) -> list[dict[str, object]]:
    """Rows of `feedback_by_model_version` (caught up first), one per model version that answered."""
    catch_up(store)
    with store.connect() as con:
        cur = con.execute("SELECT * FROM feedback_by_model_version ORDER BY model_version")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def summary(store: EventStore) -> dict[str, object]:
    """Counts and a per-model feedback table, for the CLI, the demo and asset metadata."""
    with store.connect() as con:
        one = lambda sql: con.execute(sql).fetchall()[0][0]
        rows = con.execute(
            """
            SELECT model_version, count(*), sum(thumbs_up), sum(thumbs_down), round(avg(latency_ms), 1)
            FROM interaction_feedback GROUP BY 1 ORDER BY 1
            """
        ).fetchall()
        out: dict[str, object] = {
            "head": one("SELECT value FROM store_meta WHERE key='head'"),
            "interactions": one("SELECT count(*) FROM proj_interactions"),
            "feedback": one("SELECT count(*) FROM proj_feedback"),
            "subjects": one("SELECT count(*) FROM proj_subjects"),
            "shredded_subjects": one("SELECT count(*) FROM proj_subjects WHERE shredded_position IS NOT NULL"),
            "open_dsr_requests": one("SELECT count(*) FROM proj_dsr_requests WHERE completed_position IS NULL"),
            "feedback_by_model": [
                {"model_version": r[0], "interactions": r[1], "thumbs_up": int(r[2] or 0),
                 "thumbs_down": int(r[3] or 0), "mean_latency_ms": r[4]}
                for r in rows
            ],
        }
    out["canonical_hash"] = canonical_hash(store)
    md = ["| model version | interactions | 👍 | 👎 | mean latency ms |", "|---|---|---|---|---|"]
    md += [
        f"| {r['model_version']} | {r['interactions']} | {r['thumbs_up']} | {r['thumbs_down']} | {r['mean_latency_ms']} |"
        for r in out["feedback_by_model"]  # type: ignore[union-attr]
    ]
    out["feedback_by_model_md"] = "\n".join(md)
    return out
