"""The corpus sources: `sources.toml` (project root) loaded and validated.

`sources.toml` is the one place that declares what the flywheel may read and under which license:

    [sources.dolma_cc]                      # the source name (documents' `source` column)
    format = "jsonl"                        # which reader: one of FORMATS
    paths = ["corpora/dolma_cc/CC-MAIN-*.jsonl.gz"]   # relative to the data root; globs allowed
    license = "ODC-By-1.0"                  # required: an SPDX id or expression (LicenseRef-… allowed)
    domain = "web"                          # optional: a label for mixing and reports
    weight = 1.0                            # optional (default 1.0): sampling weight used by mixing
    retention_days = 365                    # optional: how long documents of this source may be kept
    boilerplate = true                      # optional (default true): frequency-based boilerplate removal
    [sources.dolma_cc.options]              # optional: reader keyword arguments (checked per format)
    url_field = "metadata.warc_url"
    [sources.dolma_cc.quality]              # optional: quality-filter overrides (filters.QualityFilters)
    c4 = false                              #   e.g. switch a filter off, or set its thresholds

Relative paths resolve against a *data root* given at load time, so the tests point the same file at
`../shared/data` and the demo at the project's shipped samples. A source without a license, with an
unknown format, an unknown key or option, or whose paths match no file is refused with an error that
names the source and the file (`allow_missing=True` keeps sources whose files are absent and lists what
is missing in `Source.missing`, for a data root that ships only some of them).

    python -m flywheel.curation.sources [DATA_ROOT]     # validate and list the sources
"""

from __future__ import annotations

import glob
import math
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "sources.toml"

# format → the reader options a source may set (the keyword arguments of that reader in readers.py).
FORMATS: dict[str, frozenset[str]] = {
    "jsonl": frozenset(
        {"id_field", "text_field", "created_field", "url_field", "title_field", "subject_field"}
    ),
    "gutenberg": frozenset(),
    "wikitext": frozenset({"detokenize"}),
    "mediawiki": frozenset({"include_redirects"}),
    "stackexchange": frozenset({"site"}),
    "warc": frozenset({"include_tables"}),
}
_KEYS = frozenset({"format", "paths", "license", "domain", "weight", "retention_days", "options", "quality",
                   "boilerplate"})

# One SPDX license id (or LicenseRef-…); expressions combine them with AND / OR / WITH and parentheses.
_LICENSE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
_LICENSE_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class SourceConfigError(ValueError):
    """`sources.toml` declares something the flywheel cannot read or may not use."""


@dataclass(frozen=True)
class Source:
    """One declared corpus: where its files are, how to read them, and its license."""

    name: str
    format: str
    license: str
    paths: tuple[Path, ...]  # the files found under the data root, sorted, globs expanded
    patterns: tuple[str, ...]  # the paths as written in the config
    domain: str | None = None
    weight: float = 1.0
    retention_days: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()  # patterns that matched no file (only with allow_missing=True)
    quality: Mapping[str, Any] = field(default_factory=dict)  # QualityFilters.from_config overrides
    boilerplate: bool = True  # frequency-based boilerplate removal (off for structured text)


def _check_license(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SourceConfigError(
            f"{where}: no license. Every source must declare `license` (an SPDX id such as "
            f'"CC-BY-SA-3.0" or "LicenseRef-…"); data without a known license is not read.'
        )
    tokens = _LICENSE_TOKEN.findall(value)
    expect_id, depth = True, 0
    for tok in tokens:
        if tok == "(":
            depth += 1
            continue
        if tok == ")":
            depth -= 1
            if depth < 0 or expect_id:
                break
            continue
        if expect_id:
            if tok.upper() in {"AND", "OR", "WITH"} or not _LICENSE_ID.match(tok):
                break
            expect_id = False
        else:
            if tok.upper() not in {"AND", "OR", "WITH"}:
                break
            expect_id = True
    else:
        if depth == 0 and not expect_id:
            return value.strip()
    raise SourceConfigError(
        f'{where}: license {value!r} is not an SPDX id or expression (e.g. "ODC-By-1.0", '
        f'"CC-BY-SA-3.0 OR GFDL-1.3-or-later", "LicenseRef-PublicDomain-US")'
    )


def _resolve(pattern: str, data_root: Path) -> list[Path]:
    p = Path(pattern).expanduser()
    full = p if p.is_absolute() else data_root / p
    if glob.has_magic(str(full)):
        return sorted(Path(m) for m in glob.glob(str(full), recursive=True) if Path(m).is_file())
    return [full] if full.is_file() else []


def _parse_source(name: str, spec: Any, config: Path, data_root: Path, allow_missing: bool) -> Source:
    where = f"{config}: source {name!r}"
    if not _SOURCE_NAME.match(name):
        raise SourceConfigError(f"{where}: a source name is lower-case letters, digits, '_', '-', '.'")
    if not isinstance(spec, dict):
        raise SourceConfigError(f"{where}: expected a table [sources.{name}]")
    license_ = _check_license(spec.get("license"), where)
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise SourceConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise SourceConfigError(f"{where}: unknown format {fmt!r}; one of {sorted(FORMATS)}")
    patterns = spec.get("paths")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise SourceConfigError(f"{where}: `paths` must be a non-empty list of file paths or globs")
    weight = spec.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise SourceConfigError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
    retention = spec.get("retention_days")
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, int) or retention <= 0
    ):
        raise SourceConfigError(f"{where}: retention_days must be a positive integer, got {retention!r}")
    domain = spec.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise SourceConfigError(f"{where}: domain must be a string, got {domain!r}")
    options = spec.get("options", {})
    if not isinstance(options, dict):
        raise SourceConfigError(f"{where}: options must be a table [sources.{name}.options]")
    bad_options = sorted(set(options) - FORMATS[fmt])
    if bad_options:
        raise SourceConfigError(
            f"{where}: option(s) {bad_options} not understood by the {fmt!r} reader; "
            f"allowed: {sorted(FORMATS[fmt]) or 'none'}"
        )

    quality = spec.get("quality", {})
    if not isinstance(quality, dict):
        raise SourceConfigError(f"{where}: quality must be a table [sources.{name}.quality]")
    try:
        from flywheel.curation.filters import QualityFilters

        QualityFilters.from_config(quality)
    except (ValueError, TypeError) as e:
        raise SourceConfigError(f"{where}: {e}") from None
    boilerplate = spec.get("boilerplate", True)
    if not isinstance(boilerplate, bool):
        raise SourceConfigError(f"{where}: boilerplate must be true or false, got {boilerplate!r}")

    found: list[Path] = []
    missing: list[str] = []
    for pattern in patterns:
        files = _resolve(pattern, data_root)
        if not files:
            missing.append(pattern)
        found.extend(f for f in files if f not in found)
    if missing and not allow_missing:
        shown = ", ".join(str(data_root / m) for m in missing)
        raise SourceConfigError(
            f"{where}: no file at {shown} (data root {data_root}); fix `paths`, pass the right data "
            f"root (or set FLYWHEEL_DATA_ROOT), or load with allow_missing=True"
        )
    return Source(
        name=name,
        format=fmt,
        license=license_,
        paths=tuple(found),
        patterns=tuple(patterns),
        domain=domain,
        weight=float(weight),
        retention_days=retention,
        options=dict(options),
        missing=tuple(missing),
        quality=dict(quality),
        boilerplate=boilerplate,
    )


def load_sources(
    path: Path | str | None = None,
    data_root: Path | str | None = None,
    *,
    names: Iterable[str] | None = None,
    allow_missing: bool = False,
) -> list[Source]:
    """The sources declared in `path` (default: the project's `sources.toml`), in file order.

    `data_root` (default `$FLYWHEEL_DATA_ROOT`, else the config file's directory) anchors relative
    paths. `names` selects some sources (an unknown name is an error). Every selected source is
    validated; the first problem raises `SourceConfigError` naming the source and the config file.
    """
    config = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        with open(config, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SourceConfigError(f"sources config {config} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise SourceConfigError(f"{config}: invalid TOML: {e}") from None
    root = Path(data_root or os.environ.get("FLYWHEEL_DATA_ROOT") or config.parent).expanduser().resolve()
    unknown_top = sorted(set(raw) - {"sources"})
    if unknown_top:
        raise SourceConfigError(
            f"{config}: unknown top-level key(s) {unknown_top}; sources go in [sources.NAME]"
        )
    declared = raw.get("sources", {})
    if not isinstance(declared, dict) or not declared:
        raise SourceConfigError(f"{config}: declares no sources (expected [sources.NAME] tables)")
    wanted = list(declared) if names is None else list(names)
    absent = [n for n in wanted if n not in declared]
    if absent:
        raise SourceConfigError(f"{config}: no source named {absent}; declared: {sorted(declared)}")
    return [_parse_source(n, declared[n], config, root, allow_missing) for n in wanted]


def main(argv: list[str]) -> int:
    root = argv[0] if argv else None
    for s in load_sources(data_root=root, allow_missing=True):
        state = f"{len(s.paths)} file(s)" + (f", MISSING {list(s.missing)}" if s.missing else "")
        print(f"{s.name:28} {s.format:14} {s.license:28} weight={s.weight:<5g} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
