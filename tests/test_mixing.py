"""Temperature-weighted mixing: quotas follow the formula, held-out slices never leak, licenses gate."""

from __future__ import annotations

import pyarrow as pa
import pytest

from flywheel.mixing import MixtureConfig, build_mixture


def shard(source: str, n: int, license: str = "CC0-1.0") -> pa.Table:
    return pa.table({"sample_id": [f"{source}-{i}" for i in range(n)], "source": [source] * n,
                     "license": [license] * n, "text": [f"text {i}" for i in range(n)]})


def test_temperature_flattens_and_caps_bound() -> None:
    shards = {"big": shard("big", 1000), "small": shard("small", 20)}
    t1 = build_mixture(shards, MixtureConfig(target_samples=500, temperature=1.0, heldout_fraction=0, min_heldout=0))
    t3 = build_mixture(shards, MixtureConfig(target_samples=500, temperature=3.0, max_epochs=10, heldout_fraction=0,
                                             min_heldout=0))
    share1 = t1.quotas["small"]["quota"] / 500
    share3 = t3.quotas["small"]["quota"] / 500
    assert share1 == pytest.approx(20 / 1020, abs=0.01)
    expected = (20 / 1020) ** (1 / 3) / ((20 / 1020) ** (1 / 3) + (1000 / 1020) ** (1 / 3))
    assert share3 == pytest.approx(expected, abs=0.01)  # upsampled: repeats beyond 20 samples
    epochs_capped = build_mixture(shards, MixtureConfig(target_samples=500, temperature=3.0, max_epochs=4,
                                                        heldout_fraction=0, min_heldout=0))
    assert epochs_capped.quotas["small"]["quota"] == 4 * 20  # max_epochs bounds the upsampling
    small = t3.samples.filter(pa.compute.equal(t3.samples.column("source"), "small"))
    assert set(small.column("epoch").to_pylist()) >= {0, 1}
    capped = build_mixture(shards, MixtureConfig(target_samples=500, caps={"big": 100}, heldout_fraction=0, min_heldout=0))
    assert capped.quotas["big"]["quota"] == 100


def test_heldout_never_in_the_mixture_and_deterministic() -> None:
    shards = {"a": shard("a", 200), "b": shard("b", 50)}
    m1 = build_mixture(shards, MixtureConfig(target_samples=300, seed=7))
    m2 = build_mixture(shards, MixtureConfig(target_samples=300, seed=7))
    assert m1.samples.column("sample_id").to_pylist() == m2.samples.column("sample_id").to_pylist()
    held = set(m1.heldout.column("sample_id").to_pylist())
    assert held and not held & set(m1.samples.column("sample_id").to_pylist())
    assert {r["source"] for r in m1.heldout.to_pylist()} == {"a", "b"}


def test_license_outside_the_allow_list_is_refused() -> None:
    shards = {"ok": shard("ok", 30), "bad": shard("bad", 30, license="LicenseRef-proprietary")}
    m = build_mixture(shards, MixtureConfig(target_samples=40, allowed_licenses=["CC0-1.0"]))
    assert m.refused.num_rows == 30
    assert set(m.samples.column("license").to_pylist()) == {"CC0-1.0"}
    assert "bad" not in m.quotas
