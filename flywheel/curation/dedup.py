"""Exact and MinHash-LSH near-duplicate removal, with a persistent incremental index.

Stages, named as in datatrove's `examples/minhash_deduplication.py`:

1. **signature** — normalize (NFKC, casefold, collapse whitespace); a 128-bit xxh3 hash of the
   normalized text (exact stage) and a 128-value MinHash over word 5-gram shingles (near stage).
2. **buckets** — exact groups by hash; the signature is cut into `bands × rows` and each band is
   hashed to a 64-bit bucket key; documents sharing a bucket (in the batch or in the index) are
   candidate pairs.
3. **clusters** — a candidate pair is kept only if the Jaccard similarity estimated from the two full
   signatures is ≥ the threshold; connected components of verified pairs (plus exact groups) form
   clusters, and one document per cluster is kept by a deterministic rule.
4. **filter** — the table splits into `kept` and `excluded`; every excluded row says why
   (`exact_duplicate` / `near_duplicate`), which document it duplicates (and that document's index
   batch when it came from an earlier shard) and their estimated similarity.

Keep rule: a document already in the index wins (it shipped in an earlier shard, which is
immutable); among new documents the earliest `created_at` wins (the original precedes its copies;
null times last), then the longest normalized text (most content), then the smallest `doc_id`.
The result does not depend on row order.

Hashing is numpy-vectorized over the whole batch: tokens are hashed 8 bytes at a time for all
tokens at once, shingles combine 5 token hashes with per-position odd multipliers and a 64-bit
finalizer, and the 128 permutations `x ↦ (a_k·x + b_k) mod 2^32` (a_k odd) of the shingle's 32-bit
value run as one (128 × chunk) uint32 array per chunk reduced with `np.minimum.reduceat`. All
constants derive from SHA-256 of fixed strings, so signatures stored on disk stay valid across
numpy versions and processes. See docs/dedup.md for the band-choice math and measured figures.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

DEFAULT_THRESHOLD = 0.8
NUM_PERM = 128
NGRAM = 5
# Version of the hashing scheme below; stored in every index manifest so an index built by a
# different scheme is refused instead of silently matching nothing.
HASH_SCHEME = "flywheel-minhash/1"
_CHUNK = 8192  # shingles per (num_perm × chunk) block: 4 MiB of uint32, stays in cache
_SIG_PIECE_CHARS = 1 << 20  # characters per signature piece (≈ 170k words)
_MAX_BUCKET_PAIRS = 64  # a bucket larger than this pairs each member with its first 64 only
_SIG_EMPTY = np.uint32(0xFFFFFFFF)


# --------------------------------------------------------------------------- hashing primitives


@functools.lru_cache(maxsize=64)
def _u64_constants(label: str, count: int, odd: bool) -> np.ndarray:
    """`count` 64-bit constants from SHA-256 of `label/i`: stable across numpy versions (cached, read-only)."""
    out = np.empty(count, dtype=np.uint64)
    for i in range(count):
        v = int.from_bytes(hashlib.sha256(f"{HASH_SCHEME}/{label}/{i}".encode()).digest()[:8], "little")
        out[i] = v | 1 if odd else v
    out.flags.writeable = False
    return out


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: every input bit affects every output bit."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


_POS_MULT = _u64_constants("position", 64, odd=True)  # n-gram position multipliers (n ≤ 64)
_LEN_SALT = _u64_constants("short-length", 64, odd=False)  # marks n-grams of short documents


_STR_VECTOR_MAX = 64  # tokens longer than this (URLs, base64 blobs: rare) are hashed one at a time
_STR_SEED = _u64_constants("string-seed", 1, odd=False)[0]
_STR_MULT = _u64_constants("string-mult", 1, odd=True)[0]


def hash_strings(arr: pa.Array, seed: int) -> np.ndarray:
    """64-bit hashes of every string of a non-null (large_)string array, vectorized.

    Each string is consumed in little-endian 8-byte words, all strings at once: the state starts
    from the seed and the byte length, and absorbs word j as `fmix64((state ^ word_j) · M)`. The
    Python-level cost is one numpy pass per 8 bytes of the longest token (≤ 8 passes; the few
    tokens over 64 bytes go through xxh3 one by one), not one call per token.
    """
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.null_count:
        raise ValueError("hash_strings: null in the token array")
    off_dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_dtype, count=n + 1, offset=arr.offset * off_dtype().itemsize)
    starts = offsets[:-1].astype(np.int64)
    lens = np.diff(offsets).astype(np.int64)
    h = lens.astype(np.uint64) * _STR_MULT
    h ^= _STR_SEED + np.uint64(seed)
    _fmix64(h)
    data_buf = arr.buffers()[2]
    nbytes = int(offsets[-1])
    padded = np.zeros(nbytes + 8, dtype=np.uint8)
    if nbytes:
        padded[:nbytes] = np.frombuffer(data_buf, dtype=np.uint8, count=nbytes)
    words = np.ndarray((nbytes + 1,), dtype="<u8", buffer=padded, strides=(1,))  # words[i] = bytes i..i+7
    long = lens > _STR_VECTOR_MAX

    def absorb(idx: np.ndarray | slice, j: int) -> None:
        rem = lens[idx] - 8 * j
        w = words[starts[idx] + 8 * j]
        short = rem < 8
        if short.any():  # zero the bytes past the string's end (rem ≤ 0 for empty strings)
            w[short] &= (np.uint64(1) << (8 * np.maximum(rem[short], 0)).astype(np.uint64)) - np.uint64(1)
        w ^= h[idx]
        w *= _STR_MULT
        h[idx] = _fmix64(w)

    absorb(slice(None), 0)  # every string has a first word (possibly empty): no index arrays
    nwords = np.where(long, 0, (lens + 7) // 8)
    tail = np.flatnonzero(nwords > 1)
    if len(tail):
        # strings by word count, descending (int8 keys take numpy's radix sort): iteration j works on a prefix
        tail = tail[np.argsort((-nwords[tail]).astype(np.int8), kind="stable")]
        counts = np.bincount(nwords[tail])
        active = np.cumsum(counts[::-1])[::-1]  # active[k] = tail strings with ≥ k words
        for j in range(1, len(active) - 1):  # word j exists in strings with ≥ j + 1 words
            absorb(tail[: active[j + 1]], j)
    for i in np.flatnonzero(long):
        b = padded[starts[i] : starts[i] + lens[i]].tobytes()
        h[i] ^= np.uint64(xxhash.xxh3_64_intdigest(b, seed))
    return h


def token_hashes(token_lists: pa.Array | pa.ChunkedArray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of string tokens → (flat uint64 token hashes, int64 offsets of length docs + 1)."""
    if isinstance(token_lists, pa.ChunkedArray):
        token_lists = token_lists.combine_chunks()
    offsets = np.asarray(token_lists.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    flat = pc.list_flatten(token_lists)
    return hash_strings(flat, seed), offsets


def ngram_hashes(token_h: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram of consecutive tokens within each document.

    Returns (hashes uint64, doc_offsets int64 of length docs + 1), grouped by document in order. A
    document with fewer than `n` (but at least one) tokens yields one n-gram of all its tokens, as
    datatrove does, so short documents can still match each other.
    """
    docs = len(offsets) - 1
    lengths = np.diff(offsets)
    total = len(token_h)
    parts_h: list[np.ndarray] = []
    parts_doc: list[np.ndarray] = []
    if total >= n:
        m = total - n + 1
        acc = token_h[:m] * _POS_MULT[0]
        for k in range(1, n):
            acc += token_h[k : k + m] * _POS_MULT[k]
        doc_of = np.repeat(np.arange(docs, dtype=np.int64), lengths)[:m]
        valid = np.arange(m, dtype=np.int64) + n <= offsets[doc_of + 1]
        parts_h.append(acc[valid])
        parts_doc.append(doc_of[valid])
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if len(short):
        acc = np.zeros(len(short), dtype=np.uint64)
        for k in range(n - 1):
            has = lengths[short] > k
            acc[has] += token_h[offsets[short[has]] + k] * _POS_MULT[k]
        acc += _LEN_SALT[lengths[short]]
        parts_h.append(acc)
        parts_doc.append(short.astype(np.int64))
    if not parts_h:
        return np.empty(0, dtype=np.uint64), np.zeros(docs + 1, dtype=np.int64)
    h = np.concatenate(parts_h)
    d = np.concatenate(parts_doc)
    if len(parts_h) > 1:
        order = np.argsort(d, kind="stable")
        h, d = h[order], d[order]
    _fmix64(h)
    doc_offsets = np.zeros(docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(d, minlength=docs), out=doc_offsets[1:])
    return h, doc_offsets


# --------------------------------------------------------------------------- parameters


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents with Jaccard `similarity` share at least one bucket) = 1 − (1 − s^r)^b."""
    return 1.0 - (1.0 - np.power(similarity, rows)) ** bands


def choose_bands(threshold: float, num_perm: int = NUM_PERM, min_recall: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands × rows == num_perm for a Jaccard threshold.

    Candidates are verified against the full signature afterwards, so a false positive of the
    banding costs only one vectorized comparison while a false negative is lost for good. We take
    the largest `rows` (fewest spurious candidates, smallest index) whose S-curve still makes a pair
    *at* the threshold a candidate with probability ≥ `min_recall`; its inflection then sits just
    below the threshold. For 128 permutations and 0.8 that is 16 bands × 8 rows (inflection
    (1/16)^(1/8) ≈ 0.71, P(candidate | s=0.8) = 0.947, | s=0.85) = 0.994).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    options = [(num_perm // r, r) for r in range(num_perm, 0, -1) if num_perm % r == 0]
    for b, r in options:  # largest rows first
        if candidate_probability(threshold, b, r) >= min_recall:
            return b, r
    return options[-1]


@dataclass(frozen=True)
class MinHashParams:
    """What makes two signatures comparable; stored in the index manifest."""

    num_perm: int = field(default=NUM_PERM, metadata={"help": "MinHash permutations (signature length)."})
    ngram: int = field(default=NGRAM, metadata={"help": "Words per shingle."})
    bands: int = field(default=16, metadata={"help": "LSH bands; bands × rows ≤ num_perm."})
    rows: int = field(default=8, metadata={"help": "Signature values per band."})
    seed: int = field(default=1, metadata={"help": "Seed of the word hash and the permutations."})

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if not 1 <= self.ngram <= 64:
            raise ValueError(f"ngram must be in 1..64, got {self.ngram}")

    @classmethod
    def for_threshold(cls, threshold: float = DEFAULT_THRESHOLD, num_perm: int = NUM_PERM,
                      ngram: int = NGRAM, seed: int = 1) -> MinHashParams:
        """Parameters with the banding `choose_bands` picks for `threshold`."""
        b, r = choose_bands(threshold, num_perm)
        return cls(num_perm=num_perm, ngram=ngram, bands=b, rows=r, seed=seed)

    def perms(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of the permutations x ↦ (a·x + b) mod 2^32 (a odd: a bijection), shape (num_perm, 1)."""
        a = _u64_constants(f"perm-a/{self.seed}", self.num_perm, odd=True).astype(np.uint32)
        b = _u64_constants(f"perm-b/{self.seed}", self.num_perm, odd=False).astype(np.uint32)
        return a[:, None], b[:, None]

    def band_salts(self) -> np.ndarray:
        return _u64_constants(f"band/{self.seed}", self.bands, odd=False)


# --------------------------------------------------------------------------- stage 1: signature


# Characters common in web text whose NFKC form differs (NO-BREAK SPACE, ellipsis, superscripts,
# full-width punctuation, ...). Replacing a character by its NFKD form leaves the text's NFKD, hence
# its NFKC, unchanged; doing it first lets most pages pass unicodedata's quick check instead of a
# full normalization (1.6× faster NFKC on the benchmark corpus).
_NFKD_FIRST = [(c, unicodedata.normalize("NFKD", c)) for c in "\xa0…‥″‴²³¹ºª¼½¾，（）：？！；™µ"]


def nfkc(text: str) -> str:
    """`unicodedata.normalize("NFKC", text)`, faster on typical web text."""
    if text.isascii():  # ASCII is NFKC already
        return text
    for c, d in _NFKD_FIRST:
        if c in text:
            text = text.replace(c, d)
    return unicodedata.normalize("NFKC", text)


def _fold(text: str | None) -> str:
    """NFKC + casefold of one text (no whitespace handling)."""
    return nfkc(text).casefold() if text else ""


def comparison_text(text: str | None) -> str:
    """The text both stages compare: NFKC, casefolded, whitespace runs collapsed to one space.

    Reference for one text; `signature` does the same for a batch with Arrow's whitespace split,
    which uses the same whitespace characters as `str.split()`.
    """
    return " ".join(_fold(text).split())


def normalized_tokens(texts: Sequence[str | None]) -> pa.ListArray:
    """Whitespace tokens of each normalized text (null for a text with none), split in Arrow."""
    arr = pc.utf8_trim_whitespace(pa.array([_fold(t) for t in texts], pa.large_string()))
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.large_string()), arr)
    out = pc.utf8_split_whitespace(arr)
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


@dataclass(frozen=True)
class Signatures:
    """Stage 1 output for a batch of documents (row i ↔ input row i)."""

    exact: np.ndarray  # (docs,) V16: xxh3-128 of the normalized text
    minhash: np.ndarray  # (docs, num_perm) uint32; all 0xFFFFFFFF where a doc has no shingle
    shingles: np.ndarray  # (docs,) int64 number of shingles (0 ⇒ empty text, exact stage only)
    chars: np.ndarray  # (docs,) int64 UTF-8 length of the normalized text (keep rule tie-break)


def minhash_signatures(shingle_h: np.ndarray, doc_offsets: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(docs, num_perm) uint32 MinHash signatures from grouped 64-bit shingle hashes.

    The shingle hash's high 32 bits go through num_perm permutations (a·x + b) mod 2^32; in uint32
    this runs twice as fast as 64-bit multiply-shift and its Jaccard estimates match the binomial
    standard error sqrt(J(1−J)/128) (docs/dedup.md). Documents with no shingle keep 0xFFFFFFFF.
    """
    docs = len(doc_offsets) - 1
    a, b = params.perms()
    out = np.full((docs, params.num_perm), _SIG_EMPTY, dtype=np.uint32)
    x = (shingle_h >> np.uint64(32)).astype(np.uint32)
    doc_of = np.repeat(np.arange(docs, dtype=np.int64), np.diff(doc_offsets))
    buf = np.empty((params.num_perm, _CHUNK), dtype=np.uint32)
    for s in range(0, len(x), _CHUNK):
        xs = x[s : s + _CHUNK]
        h = buf[:, : len(xs)]
        np.multiply(a, xs[None, :], out=h)
        h += b
        d = doc_of[s : s + _CHUNK]
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        piece_min = np.minimum.reduceat(h, starts, axis=1)  # (num_perm, pieces)
        rows = d[starts]  # distinct within one chunk, so fancy assignment is safe
        out[rows] = np.minimum(out[rows], piece_min.T)
    return out


def signature(texts: Sequence[str | None], params: MinHashParams) -> Signatures:
    """Stage 1: exact hashes and MinHash signatures for a batch of texts.

    Works through the batch in pieces of about `_SIG_PIECE_CHARS` characters, which keeps every
    temporary array a few MB (cache- and allocator-friendly) whatever the batch size.
    """
    pieces: list[Signatures] = []
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t) if t else 0
        if size >= _SIG_PIECE_CHARS or i == len(texts) - 1:
            pieces.append(_signature_piece(texts[start : i + 1], params))
            start, size = i + 1, 0
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return _signature_piece([], params)
    return Signatures(*(np.concatenate([getattr(p, f) for p in pieces]) for f in
                        ("exact", "minhash", "shingles", "chars")))


def _signature_piece(texts: Sequence[str | None], params: MinHashParams) -> Signatures:
    tokens = normalized_tokens(texts)
    joined = pc.fill_null(pc.binary_join(tokens, pa.scalar(" ", pa.large_string())), "")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64, count=len(joined) + 1, offset=joined.offset * 8)
    data = memoryview(joined.buffers()[2]) if joined.buffers()[2] is not None else memoryview(b"")
    digests = b"".join(xxhash.xxh3_128_digest(data[a:b]) for a, b in zip(offsets[:-1].tolist(),
                                                                           offsets[1:].tolist(), strict=True))
    exact = np.frombuffer(digests, dtype="V16").copy() if digests else np.empty(0, dtype="V16")
    tok_h, tok_off = token_hashes(tokens, params.seed)
    sh_h, sh_off = ngram_hashes(tok_h, tok_off, params.ngram)
    return Signatures(
        exact=exact,
        minhash=minhash_signatures(sh_h, sh_off, params),
        shingles=np.diff(sh_off),
        chars=np.diff(offsets).astype(np.int64),
    )


def band_hashes(sig: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(docs, bands) uint64 bucket keys; the band index is mixed in, so keys never collide across bands."""
    v = sig[:, : params.bands * params.rows].reshape(len(sig), params.bands, params.rows).astype(np.uint64)
    acc = (v * _POS_MULT[: params.rows]).sum(axis=2, dtype=np.uint64)
    acc += params.band_salts()
    return _fmix64(acc)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal signature values: an unbiased estimate of Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=1)


# --------------------------------------------------------------------------- stage 2: buckets


def expand_runs(left: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs [left_i, left_i + counts_i): (run index per element, position per element)."""
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - np.repeat(first, counts) + np.repeat(left, counts)
    return owner, pos


def _bucket_pairs(keys: np.ndarray, members: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Candidate pairs (k, 2) int64 of `members` sharing a key, each pair once, lower rank first.

    Within a bucket every pair is generated; a bucket with more than `_MAX_BUCKET_PAIRS` members
    (templated pages) pairs each member with the first `_MAX_BUCKET_PAIRS` by keep rank only, which
    bounds the work at O(bucket size) and still links every member to the bucket's best ones.
    """
    if len(keys) == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((rank, keys))
    k, m = keys[order], members[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    out: list[np.ndarray] = []
    for g in np.unique(sizes[sizes > 1]):
        gs = starts[sizes == g]
        g = int(g)
        if g <= _MAX_BUCKET_PAIRS:
            i, j = np.triu_indices(g, 1)
        else:  # (i, j) for i < _MAX_BUCKET_PAIRS < g, i < j, without materializing all g² pairs
            firsts = np.arange(_MAX_BUCKET_PAIRS)
            i = np.repeat(firsts, g - 1 - firsts)
            j = np.concatenate([np.arange(a + 1, g) for a in firsts])
        out.append(np.stack([m[gs[:, None] + i].ravel(), m[gs[:, None] + j].ravel()], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(out)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0)


# --------------------------------------------------------------------------- the persistent index

_FILE_RE = re.compile(r"^b(\d{6})-g(\d+)\.(docs\.parquet|sig\.npy|bands\.npy)(\.tmp)?$")
_MANIFEST = "manifest.json"
_FORMAT = "flywheel-minhash-index/1"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class IndexMatches:
    """Matches of query rows against an index (global index rows; see `MinHashIndex.doc_id`)."""

    exact_query: np.ndarray  # query row with an identical normalized text in the index
    exact_row: np.ndarray  # its earliest index row
    near_query: np.ndarray  # query row of a verified near-duplicate pair
    near_row: np.ndarray
    near_similarity: np.ndarray  # estimated Jaccard ≥ threshold
    candidates: int  # bucket-sharing pairs before verification


class MinHashIndex:
    """MinHash signatures of every document kept so far, on disk, queried without recomputation.

    Layout of the directory (no pickle anywhere):

    - `manifest.json` — format, `MinHashParams`, and per batch: `seq`, `batch_id`, `generation`,
      document count, file names and their SHA-256. It is replaced atomically (write, fsync,
      rename) after the batch files are durable, so the files it names are always complete.
    - `bSSSSSS-gG.docs.parquet` — `doc_id` (string), `exact_hash` (fixed_size_binary(16)).
    - `bSSSSSS-gG.sig.npy` — (docs, num_perm) uint32 signatures, read through a memory map.
    - `bSSSSSS-gG.bands.npy` — (docs, bands) uint64 bucket keys, loaded at open.

    Concurrency: one writer at a time. `add_batch`, `remove` and `writing()` hold a `filelock`
    on `index.lock` and reload the manifest first if another process changed it; loading also
    takes the lock, so a reader never sees a manifest whose files a concurrent removal deleted. A
    process that already loaded the index keeps a consistent snapshot (unlinked files stay readable
    through its memory maps) until it calls `refresh()`. Files not named by the manifest (left by a
    crash mid-write) are deleted by the next writer.

    Removal (`remove`, `remove_batch`) rewrites every affected batch as a new generation without
    the removed rows and unlinks the old files, so the removed signatures, bucket keys, exact
    hashes and ids are gone from the index files, and an erased document no longer anchors or
    suppresses others.
    """

    def __init__(self, path: str | Path, params: MinHashParams | None = None) -> None:
        from filelock import FileLock

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path / "index.lock"))
        self._version = -1
        with self._lock:
            manifest_path = self.path / _MANIFEST
            if manifest_path.exists():
                stored = self._read_manifest()
                stored_params = MinHashParams(**stored["params"])
                if params is not None and params != stored_params:
                    raise ValueError(
                        f"{manifest_path}: index was built with {stored_params}, not {params}; "
                        "open it without params or use another directory"
                    )
                self.params = stored_params
            else:
                self.params = params or MinHashParams()
                self._write_manifest({"format": _FORMAT, "hash_scheme": HASH_SCHEME, "version": 0,
                                      "next_seq": 1, "params": asdict(self.params), "batches": []})
            self._load()

    # ----------------------------------------------------------------- manifest and loading

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / _MANIFEST
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable index manifest ({e})") from e
        if m.get("format") != _FORMAT or m.get("hash_scheme") != HASH_SCHEME:
            raise ValueError(
                f"{path}: format {m.get('format')!r}/{m.get('hash_scheme')!r}, expected {_FORMAT!r}/"
                f"{HASH_SCHEME!r}; rebuild the index"
            )
        return m

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        _write_atomic(self.path / _MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        _fsync_dir(self.path)

    def _load(self) -> None:
        """Read the manifest and every batch's ids, exact hashes and bucket keys (signatures mmapped)."""
        m = self._read_manifest()
        self._manifest = m
        self._version = m["version"]
        ids: list[str] = []
        exact: list[np.ndarray] = []
        bands: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        batch_of: list[np.ndarray] = []
        for bi, b in enumerate(m["batches"]):
            docs = _read_docs(self.path / b["files"]["docs"])
            ids.extend(docs["doc_id"].to_pylist())
            exact.append(_fixed16_to_void(docs["exact_hash"]))
            bands.append(np.load(self.path / b["files"]["bands"], allow_pickle=False))
            self._sigs.append(np.load(self.path / b["files"]["sig"], mmap_mode="r", allow_pickle=False))
            batch_of.append(np.full(b["docs"], bi, dtype=np.int32))
        n = len(ids)
        self._ids = np.array(ids, dtype=object)
        self._row_of = {d: i for i, d in enumerate(ids)}
        self._batch_of = np.concatenate(batch_of) if batch_of else np.empty(0, dtype=np.int32)
        self._batch_start = np.cumsum([0] + [b["docs"] for b in m["batches"]])
        ex = np.concatenate(exact) if exact else np.empty(0, dtype="V16")
        self._exact_order = np.argsort(ex, kind="stable")
        self._exact_sorted = ex[self._exact_order]
        bk = np.concatenate(bands) if bands else np.empty((0, self.params.bands), dtype=np.uint64)
        flat = bk.ravel()
        self._band_order = np.argsort(flat, kind="stable")
        self._band_sorted = flat[self._band_order]
        self._band_row = (self._band_order // self.params.bands).astype(np.int64)
        assert len(self._band_row) == n * self.params.bands

    def _extend(self, manifest: dict[str, Any], doc_ids: list[str], exact: np.ndarray) -> None:
        """Add the manifest's last batch to the loaded state by merging, without re-reading the others."""
        entry = manifest["batches"][-1]
        bi, n0 = len(manifest["batches"]) - 1, len(self._ids)
        rows = np.arange(n0, n0 + len(doc_ids), dtype=np.int64)
        bands = np.load(self.path / entry["files"]["bands"], allow_pickle=False)
        self._sigs.append(np.load(self.path / entry["files"]["sig"], mmap_mode="r", allow_pickle=False))
        self._ids = np.concatenate([self._ids, np.array(doc_ids, dtype=object)])
        self._row_of.update(zip(doc_ids, rows.tolist(), strict=True))
        self._batch_of = np.concatenate([self._batch_of, np.full(len(doc_ids), bi, dtype=np.int32)])
        self._batch_start = np.append(self._batch_start, n0 + len(doc_ids))
        # sorted merges; new rows go after equal old keys, so "earliest row first" still holds
        o = np.argsort(exact, kind="stable")
        at = np.searchsorted(self._exact_sorted, exact[o], side="right")
        self._exact_sorted = np.insert(self._exact_sorted, at, exact[o])
        self._exact_order = np.insert(self._exact_order, at, rows[o])
        flat = bands.ravel()
        o = np.argsort(flat, kind="stable")
        at = np.searchsorted(self._band_sorted, flat[o], side="right")
        self._band_sorted = np.insert(self._band_sorted, at, flat[o])
        self._band_row = np.insert(self._band_row, at, n0 + o // self.params.bands)
        self._manifest, self._version = manifest, manifest["version"]

    def refresh(self) -> None:
        """Reload if another process changed the index since this one loaded it."""
        with self._lock:
            if self._read_manifest()["version"] != self._version:
                self._load()

    @contextmanager
    def writing(self) -> Iterator[MinHashIndex]:
        """Hold the writer lock (reentrant) with a fresh view: query-then-add is atomic inside."""
        with self._lock:
            if self._read_manifest()["version"] != self._version:
                self._load()
            yield self

    # ----------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row_of

    @property
    def batches(self) -> list[dict[str, Any]]:
        """The manifest's batch entries (seq, batch_id, generation, docs, files, sha256)."""
        return [dict(b) for b in self._manifest["batches"]]

    def doc_id(self, rows: np.ndarray) -> list[str]:
        return self._ids[np.asarray(rows, dtype=np.int64)].tolist()

    def batch_id(self, rows: np.ndarray) -> list[str]:
        names = [b["batch_id"] for b in self._manifest["batches"]]
        return [names[i] for i in self._batch_of[np.asarray(rows, dtype=np.int64)]]

    def signatures(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), num_perm) uint32 signatures of global index rows, read from the memory maps."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.params.num_perm), dtype=np.uint32)
        if len(rows) == 0:
            return out
        bidx = self._batch_of[rows]
        for bi in np.unique(bidx):
            sel = bidx == bi
            out[sel] = self._sigs[bi][rows[sel] - self._batch_start[bi]]
        return out

    def query(self, sig: Signatures, threshold: float, rows: np.ndarray | None = None) -> IndexMatches:
        """Exact and verified near-duplicate matches of (a subset `rows` of) `sig` in the index."""
        q = np.arange(len(sig.exact), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        # exact: identical normalized text
        ex = sig.exact[q]
        pos = np.searchsorted(self._exact_sorted, ex)
        pos_c = np.minimum(pos, max(len(self._exact_sorted) - 1, 0))
        hit = (pos < len(self._exact_sorted)) & (self._exact_sorted[pos_c] == ex) if len(self._exact_sorted) \
            else np.zeros(len(q), dtype=bool)
        exact_query, exact_row = q[hit], self._exact_order[pos_c[hit]].astype(np.int64)
        # near: bucket keys → candidate rows → verify on full signatures
        nq = q[sig.shingles[q] > 0]
        empty = np.empty(0, dtype=np.int64)
        if len(nq) == 0 or len(self._band_sorted) == 0:
            return IndexMatches(exact_query, exact_row, empty, empty, np.empty(0), 0)
        keys = band_hashes(sig.minhash[nq], self.params).ravel()
        left = np.searchsorted(self._band_sorted, keys, "left")
        right = np.searchsorted(self._band_sorted, keys, "right")
        owner, p = expand_runs(left, right - left)
        pairs = np.unique(np.stack([nq[owner // self.params.bands], self._band_row[p]], axis=1), axis=0) \
            if len(p) else np.empty((0, 2), dtype=np.int64)
        if len(pairs) == 0:
            return IndexMatches(exact_query, exact_row, empty, empty, np.empty(0), 0)
        sim = _verify(sig.minhash, pairs[:, 0], self.signatures(pairs[:, 1]))
        ok = sim >= threshold
        return IndexMatches(exact_query, exact_row, pairs[ok, 0], pairs[ok, 1], sim[ok], len(pairs))

    def verify(self) -> None:
        """Check every batch file against the SHA-256 in the manifest; raise naming the bad file."""
        for b in self._manifest["batches"]:
            for kind, name in b["files"].items():
                digest = _sha256_file(self.path / name)
                if digest != b["sha256"][kind]:
                    raise ValueError(f"{self.path / name}: SHA-256 {digest} ≠ manifest {b['sha256'][kind]}")

    # ----------------------------------------------------------------- writing

    def add_batch(self, batch_id: str, doc_ids: Sequence[str], sig: Signatures,
                  rows: np.ndarray | None = None) -> None:
        """Append documents (rows `rows` of `sig`, default all) as a new batch named `batch_id`."""
        rows = np.arange(len(sig.exact), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(doc_ids) != len(rows):
            raise ValueError(f"batch {batch_id!r}: {len(doc_ids)} doc_ids for {len(rows)} signature rows")
        with self.writing():
            m = self._manifest
            if any(b["batch_id"] == batch_id for b in m["batches"]):
                raise ValueError(f"{self.path}: batch {batch_id!r} is already indexed; remove_batch() it first")
            seen: set[str] = set()
            for d in doc_ids:
                if d in self._row_of:
                    b = self._manifest["batches"][self._batch_of[self._row_of[d]]]["batch_id"]
                    raise ValueError(f"{self.path}: doc_id {d!r} is already indexed (batch {b!r})")
                if d in seen:
                    raise ValueError(f"batch {batch_id!r}: doc_id {d!r} appears twice")
                seen.add(d)
            self._gc(m)
            if len(rows) == 0:
                return
            seq = m["next_seq"]
            entry = self._write_batch_files(seq, 0, batch_id, list(doc_ids), sig.exact[rows], sig.minhash[rows])
            m = dict(m, version=m["version"] + 1, next_seq=seq + 1, batches=m["batches"] + [entry])
            self._write_manifest(m)
            self._extend(m, list(doc_ids), sig.exact[rows])

    def remove(self, doc_ids: Sequence[str]) -> int:
        """Delete documents from the index (rewriting their batches); returns how many were present."""
        with self.writing():
            m = self._manifest
            drop_rows = np.array(sorted({self._row_of[d] for d in doc_ids if d in self._row_of}), dtype=np.int64)
            if len(drop_rows) == 0:
                return 0
            affected = set(self._batch_of[drop_rows].tolist())
            old_files = []
            batches = []
            for bi, b in enumerate(m["batches"]):
                if bi not in affected:
                    batches.append(b)
                    continue
                old_files.extend(b["files"].values())
                lo, hi = self._batch_start[bi], self._batch_start[bi + 1]
                keep = np.setdiff1d(np.arange(lo, hi), drop_rows)
                if len(keep) == 0:
                    continue
                sig_rows = np.asarray(self._sigs[bi][keep - lo])
                exact = self._exact_by_row(keep)
                batches.append(self._write_batch_files(b["seq"], b["generation"] + 1, b["batch_id"],
                                                       self._ids[keep].tolist(), exact, sig_rows, b))
            self._write_manifest(dict(m, version=m["version"] + 1, batches=batches))
            self._sigs = []  # drop our memory maps before unlinking
            for name in old_files:
                (self.path / name).unlink(missing_ok=True)
            _fsync_dir(self.path)
            self._load()
            return len(drop_rows)

    def remove_batch(self, batch_id: str) -> int:
        """Delete a whole batch (e.g. before re-materializing its shard); returns its document count."""
        with self.writing():
            names = [b["batch_id"] for b in self._manifest["batches"]]
            if batch_id not in names:
                return 0
            bi = names.index(batch_id)
            return self.remove(self._ids[self._batch_start[bi] : self._batch_start[bi + 1]].tolist())

    def _exact_by_row(self, rows: np.ndarray) -> np.ndarray:
        inv = np.empty_like(self._exact_order)
        inv[self._exact_order] = np.arange(len(self._exact_order))
        return self._exact_sorted[inv[rows]]

    def _write_batch_files(self, seq: int, gen: int, batch_id: str, doc_ids: list[str], exact: np.ndarray,
                           minhash: np.ndarray, prev: dict[str, Any] | None = None) -> dict[str, Any]:
        import pyarrow.parquet as pq

        stem = f"b{seq:06d}-g{gen}"
        files = {"docs": f"{stem}.docs.parquet", "sig": f"{stem}.sig.npy", "bands": f"{stem}.bands.npy"}
        docs = pa.table({"doc_id": pa.array(doc_ids, pa.string()),
                         "exact_hash": pa.array([bytes(e) for e in exact], pa.binary(16))})
        _write_atomic(self.path / files["docs"], lambda p: pq.write_table(docs, p))
        minhash = np.ascontiguousarray(minhash, dtype=np.uint32)
        _write_atomic(self.path / files["sig"], lambda p: _save_npy(p, minhash))
        bk = band_hashes(minhash, self.params)
        _write_atomic(self.path / files["bands"], lambda p: _save_npy(p, bk))
        _fsync_dir(self.path)
        return {
            "seq": seq, "batch_id": batch_id, "generation": gen, "docs": len(doc_ids), "files": files,
            "sha256": {k: _sha256_file(self.path / v) for k, v in files.items()},
            "added_at": (prev or {}).get("added_at") or datetime.now(UTC).isoformat(),
        }

    def _gc(self, manifest: dict[str, Any]) -> None:
        """Delete batch files no manifest entry names (left by a crash between write and rename)."""
        named = {f for b in manifest["batches"] for f in b["files"].values()}
        for p in self.path.iterdir():
            if _FILE_RE.match(p.name) and p.name not in named:
                p.unlink(missing_ok=True)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _read_docs(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _fixed16_to_void(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty(0, dtype="V16")
    return np.frombuffer(arr.buffers()[1], dtype="V16", count=len(arr), offset=arr.offset * 16).copy()


def _verify(query_sig: np.ndarray, q_rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of query_sig[q_rows[i]] vs other[i], in chunks to bound memory."""
    out = np.empty(len(q_rows))
    for s in range(0, len(q_rows), 65536):
        out[s : s + 65536] = estimated_jaccard(query_sig[q_rows[s : s + 65536]], other[s : s + 65536])
    return out


# --------------------------------------------------------------------------- stage 3: clusters


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (a, b): label = smallest node id in the component."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        diff = lo != hi
        if not diff.any():
            return parent
        np.minimum.at(parent, hi[diff], lo[diff])
        while True:  # pointer jumping until every node points at its root
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp


@dataclass(frozen=True)
class DedupResult:
    """Output of `dedup_table`: nothing is dropped without a row in `excluded`."""

    kept: pa.Table  # input rows kept, input schema unchanged
    excluded: pa.Table  # input rows dropped + reason, kept_doc_id, kept_batch_id, similarity
    clusters: pa.Table  # one row per member of every non-singleton cluster (index anchors included)
    pairs: pa.Table  # verified edges: doc_id, other_doc_id, other_batch_id, kind, similarity
    stats: dict[str, Any]


CLUSTER_SCHEMA = pa.schema([("cluster_id", pa.string()), ("doc_id", pa.string()), ("batch_id", pa.string()),
                            ("role", pa.string()), ("reason", pa.string()), ("similarity", pa.float64())])
PAIR_SCHEMA = pa.schema([("doc_id", pa.string()), ("other_doc_id", pa.string()), ("other_batch_id", pa.string()),
                         ("kind", pa.string()), ("similarity", pa.float64())])


def _keep_rank(table: pa.Table, chars: np.ndarray) -> np.ndarray:
    """Rank of every row under the keep rule (0 = best): created_at ↑ (nulls last), length ↓, doc_id ↑."""
    n = table.num_rows
    keys: list[np.ndarray] = []
    ids = np.array(table["doc_id"].to_pylist(), dtype=object)
    keys.append(np.unique(ids, return_inverse=True)[1])  # least significant: doc_id
    keys.append(-chars)
    if "created_at" in table.column_names:
        ts = pc.cast(table["created_at"].combine_chunks(), pa.int64())
        null = pc.is_null(ts).to_numpy(zero_copy_only=False)
        t = pc.fill_null(ts, 0).to_numpy(zero_copy_only=False)
        keys.extend([t, null])  # most significant: null flag, then time
    order = np.lexsort(keys)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def dedup_table(
    table: pa.Table,
    index: MinHashIndex | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    batch_id: str | None = None,
    params: MinHashParams | None = None,
) -> DedupResult:
    """Exact + near-duplicate removal over a table with `doc_id`, `text` (and optionally `created_at`).

    Without `index`, the table is deduplicated against itself. With `index`, it is also matched
    against every earlier batch (those documents always win), and the kept rows are added to the
    index as batch `batch_id` (default: a digest of the doc ids) under the index's writer lock, so
    two processes cannot both keep the same near-duplicate. `params` default to the index's, or
    to `MinHashParams.for_threshold(threshold)`.
    """
    for col in ("doc_id", "text"):
        if col not in table.column_names:
            raise ValueError(f"dedup_table: input has no {col!r} column (columns: {table.column_names})")
    doc_ids: list[str] = table["doc_id"].to_pylist()
    if any(d is None for d in doc_ids):
        raise ValueError(f"dedup_table: null doc_id at row {doc_ids.index(None)}")
    if len(set(doc_ids)) != len(doc_ids):
        seen: set[str] = set()
        dup = next(d for d in doc_ids if d in seen or seen.add(d))  # type: ignore[func-returns-value]
        raise ValueError(f"dedup_table: doc_id {dup!r} appears more than once in the input")
    if index is not None:
        if params is not None and params != index.params:
            raise ValueError(f"dedup_table: params {params} differ from the index's {index.params}")
        params = index.params
    params = params or MinHashParams.for_threshold(threshold)
    if batch_id is None:
        batch_id = "batch-" + hashlib.sha256("\n".join(sorted(doc_ids)).encode()).hexdigest()[:16]

    sig = signature(table["text"].to_pylist(), params)  # stage 1
    if index is None:
        return _dedup(table, doc_ids, sig, params, threshold, None, batch_id)[0]
    with index.writing():
        present = [d for d in doc_ids if d in index]
        if present:
            raise ValueError(f"{index.path}: doc_id {present[0]!r} (and {len(present) - 1} more) already "
                             "indexed; remove_batch() the earlier run before deduplicating it again")
        result, kept_mask = _dedup(table, doc_ids, sig, params, threshold, index, batch_id)
        kept_rows = np.flatnonzero(kept_mask)
        index.add_batch(batch_id, [doc_ids[i] for i in kept_rows], sig, kept_rows)
    return result


def _dedup(table: pa.Table, doc_ids: list[str], sig: Signatures, params: MinHashParams, threshold: float,
           index: MinHashIndex | None, batch_id: str) -> tuple[DedupResult, np.ndarray]:
    """Stages 2–4 for one batch; returns the result and the kept-row mask."""
    n = table.num_rows
    rank = _keep_rank(table, sig.chars)

    # stage 2a, exact buckets: every row points at its group's best-ranked row (its representative)
    order = np.lexsort((rank, sig.exact)) if n else np.empty(0, dtype=np.int64)
    ex_sorted = sig.exact[order]
    new_group = np.r_[True, ex_sorted[1:] != ex_sorted[:-1]] if n else np.empty(0, dtype=bool)
    rep = np.empty(n, dtype=np.int64)
    rep[order] = order[np.flatnonzero(new_group)[np.cumsum(new_group) - 1]]
    reps = np.flatnonzero(rep == np.arange(n))

    # nodes: 0..n-1 batch rows, n.. matched index rows
    ea: list[np.ndarray] = [np.arange(n)[rep != np.arange(n)]]
    eb: list[np.ndarray] = [rep[rep != np.arange(n)]]
    index_rows = np.empty(0, dtype=np.int64)
    candidates = 0
    m: IndexMatches | None = None
    if index is not None and len(index):
        m = index.query(sig, threshold, reps)
        candidates += m.candidates
        index_rows = np.unique(np.r_[m.exact_row, m.near_row])
    node_of_index = {int(r): n + i for i, r in enumerate(index_rows)}

    # stage 2b, LSH buckets within the batch (representatives with shingles only)
    near_reps = reps[sig.shingles[reps] > 0]
    keys = band_hashes(sig.minhash[near_reps], params)
    pairs = _bucket_pairs(keys.ravel(), np.repeat(near_reps, params.bands), np.repeat(rank[near_reps], params.bands))
    candidates += len(pairs)
    pair_sim = _verify(sig.minhash, pairs[:, 0], sig.minhash[pairs[:, 1]]) if len(pairs) else np.empty(0)
    ok = pair_sim >= threshold
    near_a, near_b, near_s = pairs[ok, 0], pairs[ok, 1], pair_sim[ok]
    ea.append(near_a)
    eb.append(near_b)
    if m is not None:
        ea.extend([m.exact_query, m.near_query])
        eb.extend([np.array([node_of_index[int(r)] for r in m.exact_row], dtype=np.int64),
                   np.array([node_of_index[int(r)] for r in m.near_row], dtype=np.int64)])

    # stage 3, clusters: components over exact + verified edges; index rows outrank every new row
    total = n + len(index_rows)
    a = np.concatenate(ea).astype(np.int64)
    b = np.concatenate(eb).astype(np.int64)
    label = _components(total, a, b)
    node_rank = np.r_[rank + len(index_rows), np.arange(len(index_rows))]  # index rows are in add order
    best = np.full(total, np.iinfo(np.int64).max)
    np.minimum.at(best, label, node_rank)
    inv_rank = np.empty(total, dtype=np.int64)
    inv_rank[node_rank] = np.arange(total)
    kept_node = inv_rank[best[label]]  # per node: the node its cluster keeps

    row_kept_node = kept_node[:n]
    kept_mask = row_kept_node == np.arange(n)
    drop = np.flatnonzero(~kept_mask)
    all_sig = np.concatenate([sig.minhash, index.signatures(index_rows)]) if len(index_rows) else sig.minhash
    sim_to_kept = np.ones(n)
    if len(drop):
        sim_to_kept[drop] = estimated_jaccard(all_sig[drop], all_sig[row_kept_node[drop]])
    # exact stage drops every non-representative row, and a row identical to an index document
    exact_drop = rep != np.arange(n)
    if m is not None:
        exact_drop[m.exact_query] = True  # (the rest of their groups are non-representatives)
    reason = np.where(exact_drop, "exact_duplicate", "near_duplicate")

    node_doc = doc_ids + (index.doc_id(index_rows) if len(index_rows) else [])
    node_batch = [batch_id if index is not None else None] * n + (
        index.batch_id(index_rows) if len(index_rows) else [])

    # stage 4, filter
    kept = table.filter(pa.array(kept_mask))
    excluded = table.take(pa.array(drop, pa.int64()))
    extra = {
        "reason": pa.array(reason[drop].tolist(), pa.string()),
        "kept_doc_id": pa.array([node_doc[k] for k in row_kept_node[drop]], pa.string()),
        "kept_batch_id": pa.array([node_batch[k] if k >= n else None for k in row_kept_node[drop]], pa.string()),
        "similarity": pa.array(sim_to_kept[drop], pa.float64()),
    }
    for name, col in extra.items():
        if name in excluded.column_names:
            excluded = excluded.drop_columns([name])
        excluded = excluded.append_column(name, col)

    # clusters table: members of non-singleton clusters
    sizes = np.bincount(label, minlength=total)
    members = np.flatnonzero(sizes[label] > 1)
    members = members[np.lexsort((node_rank[members], label[members]))]
    clusters = pa.table({
        "cluster_id": pa.array([node_doc[kept_node[i]] for i in members], pa.string()),
        "doc_id": pa.array([node_doc[i] for i in members], pa.string()),
        "batch_id": pa.array([node_batch[i] for i in members], pa.string()),
        "role": pa.array(["kept" if kept_node[i] == i else "dropped" for i in members], pa.string()),
        "reason": pa.array([None if kept_node[i] == i else str(reason[i]) for i in members], pa.string()),
        "similarity": pa.array([1.0 if kept_node[i] == i else float(sim_to_kept[i]) for i in members], pa.float64()),
    }, schema=CLUSTER_SCHEMA)

    pair_rows: dict[str, list[Any]] = {k: [] for k in PAIR_SCHEMA.names}

    def _add_pairs(x: np.ndarray, y: np.ndarray, kind: str, s: np.ndarray) -> None:
        pair_rows["doc_id"].extend(node_doc[i] for i in x)
        pair_rows["other_doc_id"].extend(node_doc[j] for j in y)
        pair_rows["other_batch_id"].extend(node_batch[j] if j >= n else None for j in y)
        pair_rows["kind"].extend([kind] * len(x))
        pair_rows["similarity"].extend(s.tolist())

    nonrep = np.flatnonzero(rep != np.arange(n))
    _add_pairs(nonrep, rep[nonrep], "exact", np.ones(len(nonrep)))
    _add_pairs(near_a, near_b, "near", near_s)
    if m is not None:
        _add_pairs(m.exact_query, np.array([node_of_index[int(r)] for r in m.exact_row], dtype=np.int64),
                   "exact", np.ones(len(m.exact_query)))
        _add_pairs(m.near_query, np.array([node_of_index[int(r)] for r in m.near_row], dtype=np.int64),
                   "near", m.near_similarity)
    pairs_table = pa.table(pair_rows, schema=PAIR_SCHEMA)

    stats: dict[str, Any] = {
        "docs": n,
        "kept": int(kept_mask.sum()),
        "excluded": len(drop),
        "exact_duplicates": int(exact_drop.sum()),
        "near_duplicates": int(len(drop) - exact_drop.sum()),
        "index_matches": int(sum(1 for k in row_kept_node[drop] if k >= n)),
        "clusters": len(np.unique(label[members])) if len(members) else 0,
        "candidate_pairs": int(candidates),
        "verified_pairs": int(len(near_a) + (len(m.near_query) if m is not None else 0)),
        "docs_without_shingles": int((sig.shingles == 0).sum()),
        "threshold": threshold,
        "bands": params.bands,
        "rows": params.rows,
        "num_perm": params.num_perm,
    }
    if index is not None:
        stats["batch_id"] = batch_id
    result = DedupResult(kept=kept, excluded=excluded, clusters=clusters, pairs=pairs_table, stats=stats)
    return result, kept_mask
