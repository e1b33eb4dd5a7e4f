"""Training mixtures: temperature-based weighted sampling over sources, with caps and a license gate.

Given the curated shards of every source, `build_mixture` decides how many samples each source
contributes:

    share_i   = w_i * n_i / sum_j w_j * n_j            (configured weight × available samples)
    p_i       = share_i^(1/T) / sum_j share_j^(1/T)    (T > 1 flattens toward uniform: scarce
                                                        sources are upsampled, big ones damped)
    quota_i   = min(round(p_i * target), cap_i, max_epochs * n_i)

Samples are drawn without replacement first and repeat (epochs) only beyond n_i, deterministically
from the seed. A slice of every source is held out (never trained on) for per-domain perplexity.
Samples whose license is outside the allow-list are refused and reported, never mixed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class MixtureConfig:
    target_samples: int = 2000
    temperature: float = 2.0
    max_epochs: int = 4
    heldout_fraction: float = 0.05
    min_heldout: int = 1
    seed: int = 0
    caps: Mapping[str, int] = field(default_factory=dict)  # source → max samples
    weights: Mapping[str, float] = field(default_factory=dict)  # source → weight (default 1.0)
    allowed_licenses: Sequence[str] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, weights: Mapping[str, float] | None = None,
                  allowed_licenses: Sequence[str] = ()) -> MixtureConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"[mixture]: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        kw.setdefault("weights", dict(weights or {}))
        kw.setdefault("allowed_licenses", list(allowed_licenses))
        return cls(**kw)


@dataclass
class Mixture:
    samples: pa.Table  # the mixture, one row per drawn sample (repeats allowed), with `epoch`
    heldout: pa.Table  # per-source held-out samples (never in `samples`)
    refused: pa.Table  # samples refused by the license gate
    quotas: dict[str, dict[str, float]]


def build_mixture(shards: Mapping[str, pa.Table], config: MixtureConfig) -> Mixture:
    """Mix the sources' shard tables (each with sample_id, source, license, text, ...)."""
    rng = np.random.default_rng(config.seed)
    allowed = set(config.allowed_licenses)
    pools: dict[str, pa.Table] = {}
    heldout: list[pa.Table] = []
    refused: list[pa.Table] = []
    for source in sorted(shards):
        table = shards[source]
        if allowed:
            ok = pc.is_in(table.column("license"), pa.array(sorted(allowed), pa.string()))
            ok = pc.fill_null(ok, False)
            if not pc.all(ok).as_py():
                refused.append(table.filter(pc.invert(ok)))
                table = table.filter(ok)
        order = rng.permutation(table.num_rows)
        n_hold = 0 if table.num_rows < 2 else max(config.min_heldout, int(round(table.num_rows * config.heldout_fraction)))
        n_hold = min(n_hold, table.num_rows - 1)
        heldout.append(table.take(pa.array(order[:n_hold], pa.int64())))
        pools[source] = table.take(pa.array(order[n_hold:], pa.int64()))

    sizes = {s: t.num_rows for s, t in pools.items()}
    weighted = {s: config.weights.get(s, 1.0) * n for s, n in sizes.items() if n}
    total = sum(weighted.values())
    quotas: dict[str, dict[str, float]] = {}
    drawn: list[pa.Table] = []
    if total:
        tempered = {s: (v / total) ** (1.0 / config.temperature) for s, v in weighted.items()}
        norm = sum(tempered.values())
        for source, t in tempered.items():
            n = sizes[source]
            p = t / norm
            quota = min(int(round(p * config.target_samples)), config.caps.get(source, 1 << 62), config.max_epochs * n)
            quotas[source] = {"available": n, "share": weighted[source] / total, "probability": p, "quota": quota,
                              "epochs": quota / n if n else 0.0}
            idx = np.concatenate([rng.permutation(n) for _ in range(-(-quota // n))])[:quota] if quota else np.empty(0, np.int64)
            epoch = np.repeat(np.arange(-(-quota // n) or 1), n)[:quota] if quota else np.empty(0, np.int64)
            part = pools[source].take(pa.array(idx, pa.int64()))
            drawn.append(part.append_column("epoch", pa.array(epoch, pa.int32())))
    samples = pa.concat_tables(drawn, promote_options="permissive") if drawn else pa.table({})
    if samples.num_rows:  # interleave the sources deterministically
        samples = samples.take(pa.array(rng.permutation(samples.num_rows), pa.int64()))
    return Mixture(
        samples=samples,
        heldout=pa.concat_tables(heldout, promote_options="permissive") if heldout else pa.table({}),
        refused=pa.concat_tables(refused, promote_options="permissive") if refused else pa.table({}),
        quotas=quotas,
    )
