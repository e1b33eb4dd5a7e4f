"""Atomic shard writes with manifests, and DVC versions (a real repo and local remote in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.shards import SAMPLE_COLUMNS, sample_id_for, with_sample_ids, write_shard
from flywheel.versioning import DvcRepo


def docs(texts: list[str]) -> pa.Table:
    return with_sample_ids(pa.table({
        "doc_id": [f"d{i}" for i in range(len(texts))], "source": ["web"] * len(texts),
        "license": ["ODC-BY"] * len(texts), "subject_id": [None] * len(texts), "text": texts,
        "quality_words": list(range(len(texts))),
    }))


def test_shard_has_the_lineage_columns_first_and_a_queryable_manifest(tmp_path: Path) -> None:
    info = write_shard(docs(["alpha beta", "gamma"]), tmp_path / "shard", stage="dedup", source="web")
    table = pq.read_table(info.data_file)
    assert table.schema.names[: len(SAMPLE_COLUMNS)] == SAMPLE_COLUMNS.names
    assert "quality_words" in table.schema.names
    assert table.column("sample_id").to_pylist() == [sample_id_for("d0", "alpha beta"), sample_id_for("d1", "gamma")]
    rows = duckdb.sql(f"SELECT doc_id FROM read_parquet('{tmp_path}/*/manifest.parquet') ORDER BY 1").fetchall()
    assert rows == [("d0",), ("d1",)]
    assert not [p for p in (tmp_path / "shard").iterdir() if p.name.startswith(".")]  # no temp files left


def test_duplicate_sample_ids_are_refused(tmp_path: Path) -> None:
    t = docs(["same", "same"])
    t = t.set_column(t.schema.get_field_index("doc_id"), "doc_id", pa.array(["d0", "d0"]))
    with pytest.raises(ValueError, match="duplicate sample_id"):
        write_shard(with_sample_ids(t), tmp_path / "s", stage="dedup", source="web")


def test_dvc_tracks_versions_restores_and_purges_by_hash(tmp_path: Path) -> None:
    repo = DvcRepo.open(tmp_path / "dvc", remote=tmp_path / "remote")
    shard_dir = tmp_path / "dvc" / "shards" / "web"
    write_shard(docs(["version one text"]), shard_dir, stage="dedup", source="web")
    v1 = repo.track(shard_dir)
    write_shard(docs(["version two text"]), shard_dir, stage="dedup", source="web")
    v2 = repo.track(shard_dir)
    assert v1.md5 != v2.md5 and v1.md5.endswith(".dir")
    assert repo.has_object(v1.md5) == {"cache": True, "remote": True}
    old = repo.restore(v1.md5, tmp_path / "restored")
    assert pq.read_table(old / "part-00000.parquet").column("text").to_pylist() == ["version one text"]
    only_v1 = [h for h in [v1.md5, *repo.objects(v1.md5)] if h not in set(repo.objects(v2.md5))]
    removed = repo.purge(only_v1)
    assert removed == {"cache": len(only_v1), "remote": len(only_v1)}
    with pytest.raises(FileNotFoundError):
        repo.restore(v1.md5, tmp_path / "gone")
    # nothing of version one is left in cache or remote (Parquet pages are compressed: decode them)
    for base in (tmp_path / "dvc" / ".dvc" / "cache", tmp_path / "remote"):
        for p in (p for p in base.rglob("*") if p.is_file()):
            data = p.read_bytes()
            text = str(pq.read_table(p).to_pylist()) if data[:4] == b"PAR1" else data.decode(errors="replace")
            assert "version one text" not in text, p
    assert pq.read_table(shard_dir / "part-00000.parquet").column("text").to_pylist() == ["version two text"]
