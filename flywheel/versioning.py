"""Data versions with DVC: a repository under `$FLYWHEEL_HOME` with a local remote by default.

Each tracked path (a shard directory, a checkpoint) keeps one working copy; every version's content
lives in the DVC cache and remote, addressed by md5. The warehouse records the md5 of every version
it materialized (`ShardMaterialized`), so lineage reaches every version and erasure can purge them
by object hash from cache and remote.

    repo = DvcRepo.open(paths.dvc_repo, remote=paths.home / "dvc-remote")
    version = repo.track(paths.dvc_repo / "shards/dedup/c4")   # dvc add + dvc push
    repo.objects(version.md5)                                    # the file objects of that version
    repo.purge([version.md5, *repo.objects(version.md5)])        # delete from cache and remote
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@dataclass(frozen=True)
class TrackedVersion:
    path: str  # relative to the repo root
    md5: str  # DVC's hash of the path (a directory hash ends in ".dir")
    size: int
    nfiles: int | None


class DvcRepo:
    """A DVC repository without git (versions are recorded in the warehouse, not in commits)."""

    def __init__(self, root: Path, remote: Path) -> None:
        self.root = Path(root)
        self.remote = Path(remote)
        self._lock = FileLock(str(self.root) + ".lock")

    @classmethod
    def open(cls, root: Path, *, remote: Path | None = None) -> DvcRepo:
        from dvc.repo import Repo

        root = Path(root)
        remote = Path(remote) if remote else root.parent / "dvc-remote"
        repo = cls(root, remote)
        with repo._lock:
            if not (root / ".dvc").exists():
                root.mkdir(parents=True, exist_ok=True)
                Repo.init(str(root), no_scm=True)
                remote.mkdir(parents=True, exist_ok=True)
                r = Repo(str(root))
                with r.config.edit() as c:
                    c["remote"]["local"] = {"url": str(remote)}
                    c["core"]["remote"] = "local"
                    c["core"]["analytics"] = False
                    c["core"]["check_update"] = False
                r.close()
        return repo

    def _repo(self):
        from dvc.repo import Repo

        return Repo(str(self.root))

    def track(self, path: Path, *, push: bool = True) -> TrackedVersion:
        """`dvc add` the path (a file or directory inside the repo) and `dvc push` it."""
        path = Path(path).resolve()
        path.relative_to(self.root.resolve())  # raises if the path is outside the repository
        with self._lock:
            repo = self._repo()
            try:
                repo.add(str(path))
                if push:
                    repo.push(targets=[str(path) + ".dvc"])
            finally:
                repo.close()
        return self.version_of(path)

    def version_of(self, path: Path) -> TrackedVersion:
        import yaml

        path = Path(path).resolve()
        dvc_file = path.with_name(path.name + ".dvc")
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return TrackedVersion(str(path.relative_to(self.root.resolve())), out["md5"], out.get("size", 0), out.get("nfiles"))

    def _object_path(self, base: Path, md5: str) -> Path:
        return base / "files" / "md5" / md5[:2] / md5[2:]

    def objects(self, md5: str) -> list[str]:
        """The file-object hashes inside a directory version (its `.dir` listing); [] for a file."""
        if not md5.endswith(".dir"):
            return []
        for base in (self.root / ".dvc" / "cache", self.remote):
            listing = self._object_path(base, md5)
            if listing.exists():
                return [entry["md5"] for entry in json.loads(listing.read_text())]
        raise FileNotFoundError(f"directory object {md5} is in neither the cache nor the remote")

    def has_object(self, md5: str) -> dict[str, bool]:
        return {
            "cache": self._object_path(self.root / ".dvc" / "cache", md5).exists(),
            "remote": self._object_path(self.remote, md5).exists(),
        }

    def purge(self, hashes: list[str]) -> dict[str, int]:
        """Delete objects by hash from the cache and the remote; returns counts removed per store."""
        removed = {"cache": 0, "remote": 0}
        with self._lock:
            for md5 in hashes:
                for store, base in (("cache", self.root / ".dvc" / "cache"), ("remote", self.remote)):
                    p = self._object_path(base, md5)
                    if p.exists():
                        p.unlink()
                        removed[store] += 1
        return removed

    def restore(self, md5: str, dest: Path) -> Path:
        """Materialize an old directory version (from the cache, else the remote) into `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        listing = None
        for base in (self.root / ".dvc" / "cache", self.remote):
            if self._object_path(base, md5).exists():
                listing = json.loads(self._object_path(base, md5).read_text())
                break
        if listing is None:
            raise FileNotFoundError(f"version {md5} is in neither the cache nor the remote")
        for entry in listing:
            for base in (self.root / ".dvc" / "cache", self.remote):
                src = self._object_path(base, entry["md5"])
                if src.exists():
                    target = dest / entry["relpath"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, target)
                    break
            else:
                raise FileNotFoundError(f"object {entry['md5']} ({entry['relpath']}) of version {md5} is gone")
        return dest
