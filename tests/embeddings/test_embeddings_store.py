"""The embeddings file (.npz / .parquet) and token pooling — no model involved."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from medlite.embeddings.pooling import pool_tokens
from medlite.embeddings.store import FORMAT, EmbeddingSet, read_embeddings, write_embeddings
from medlite.errors import DataError


def _set(n=3, d=5) -> EmbeddingSet:
    rng = np.random.default_rng(0)
    return EmbeddingSet([f"dir/img{i}.dcm" for i in range(n)], rng.normal(size=(n, d)).astype(np.float32),
                        [f"/abs/dir/img{i}.dcm" for i in range(n)], {"pool": "mean", "model": {"kind": "x"}})


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_roundtrip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    data = _set()
    path = write_embeddings(tmp_path / f"e{suffix}", data)
    back = read_embeddings(path)
    assert back.files == data.files and back.paths == data.paths
    np.testing.assert_array_equal(back.vectors, data.vectors)
    assert back.vectors.dtype == np.float32
    assert back.metadata == {"format": FORMAT, **data.metadata}
    assert [p.name for p in tmp_path.iterdir()] == [f"e{suffix}"]       # no temporary file left behind


def test_npz_needs_no_pickle(tmp_path):
    path = write_embeddings(tmp_path / "e.npz", _set())
    with np.load(path, allow_pickle=False) as z:
        assert z["embeddings"].shape == (3, 5) and list(z["files"])[0] == "dir/img0.dcm"


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")] + ["pyarrow"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DataError, match=r"e\.parquet: .*needs pyarrow.*pip install pyarrow.*\.npz"):
        write_embeddings(tmp_path / "e.parquet", _set())
    assert not (tmp_path / "e.parquet").exists()


def test_bad_names_and_files(tmp_path):
    with pytest.raises(DataError, match=r"e\.csv: embeddings file must end in \.npz or \.parquet"):
        write_embeddings(tmp_path / "e.csv", _set())
    with pytest.raises(DataError, match="embeddings file not found"):
        read_embeddings(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: unreadable embeddings file"):
        read_embeddings(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match=r"other\.npz: not a medlite embeddings file"):
        read_embeddings(tmp_path / "other.npz")


def test_existing_file_replaced_whole(tmp_path):
    path = write_embeddings(tmp_path / "e.npz", _set(n=2))
    write_embeddings(path, _set(n=4))
    assert read_embeddings(path).vectors.shape == (4, 5)


def test_pooling():
    t = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(pool_tokens(t, "mean"), t.mean(axis=1))
    np.testing.assert_array_equal(pool_tokens(t, "max"), t[:, 2])
    np.testing.assert_array_equal(pool_tokens(t, "first"), t[:, 0])
    # fp16 features are pooled in float32: 2048 + 1 is not representable in fp16, its mean is
    half = np.array([[[2048.0], [2049.0], [2051.0], [2052.0]]], dtype=np.float16)
    out = pool_tokens(half, "mean")
    assert out.dtype == np.float32 and out[0, 0] == pytest.approx(np.mean(half.astype(np.float32)))
    with pytest.raises(DataError, match="--pool 'median'"):
        pool_tokens(t, "median")
    with pytest.raises(DataError, match=r"shape \(3, 4\)"):
        pool_tokens(t[0], "mean")
