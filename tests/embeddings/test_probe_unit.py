"""``medlite probe`` on synthetic embeddings: label matching, split rules, metrics, clear errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from medlite.context import RunContext
from medlite.embeddings.probe import match_labels, read_labels, run_probe, sklearn_modules, split_sizes
from medlite.embeddings.store import EmbeddingSet, write_embeddings
from medlite.errors import DataError, MedliteError

pytest.importorskip("sklearn")


def _blobs(n_per=10, classes=("CT", "MR", "US"), d=8, seed=0):
    """Three well-separated Gaussian clusters, plus names and labels."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(loc=3.0 * i, size=(n_per, d)) for i in range(len(classes))]).astype(np.float32)
    y = np.repeat(np.array(classes), n_per)
    names = [f"scans/{c}_{i}.png" for c in classes for i in range(n_per)]
    return X, y, names


def _write(tmp_path, X, names, labels: dict, header="file,label"):
    emb = write_embeddings(tmp_path / "e.npz", EmbeddingSet(names, X, metadata={"model": {"kind": "test"}}))
    csv = tmp_path / "labels.csv"
    csv.write_text(header + "\n" + "".join(f"{f},{l}\n" for f, l in labels.items()))
    return emb, csv


def test_probe_separates_clusters_and_beats_baseline():
    X, y, _ = _blobs()
    res = run_probe(X, y, test_size=0.3, seed=0, c=1.0, max_iter=1000)
    assert res["probe"]["accuracy"] == 1.0 and res["probe"]["macro_f1"] == 1.0
    # the baseline predicts one class: on a balanced 9-sample test split it gets exactly a third right
    assert res["test"] == 9 and res["baseline"]["accuracy"] == pytest.approx(1 / 3)
    assert res["beats_baseline"] is True
    assert res["probe"]["train_s"] > 0 and res["probe"]["inference_s"] > 0 and res["peak_rss_bytes"] > 0
    # 3x8 weights + 3 intercepts + the scaler's 2x8 statistics, in float32 or float64
    assert (3 * 8 + 3 + 2 * 8) * 4 <= res["probe"]["model_bytes"] <= (3 * 8 + 3 + 2 * 8) * 8
    assert res["classes"] == {"CT": 10, "MR": 10, "US": 10} and res["threads"] == 1
    with pytest.raises(DataError, match="--threads must be at least 1"):
        run_probe(X, y, test_size=0.3, seed=0, c=1.0, max_iter=1000, threads=0)


def test_noise_does_not_beat_baseline():
    """Labels unrelated to the vectors: the verdict must be able to say no."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 8)).astype(np.float32)
    y = np.array(["a"] * 30 + ["b"] * 10)
    res = run_probe(X, y, test_size=0.5, seed=0, c=1e-4, max_iter=1000)
    assert res["baseline"]["accuracy"] == 0.75
    assert res["beats_baseline"] is False


def test_split_is_seeded():
    X, y, _ = _blobs(seed=3, d=2)
    X = X + np.random.default_rng(0).normal(scale=3.0, size=X.shape).astype(np.float32)   # overlap
    a = run_probe(X, y, test_size=0.3, seed=5, c=1.0, max_iter=1000)
    b = run_probe(X, y, test_size=0.3, seed=5, c=1.0, max_iter=1000)
    assert a["probe"]["accuracy"] == b["probe"]["accuracy"] and a["probe"]["macro_f1"] == b["probe"]["macro_f1"]


def test_split_rules():
    with pytest.raises(DataError, match=r"labels\.csv: class\(es\) 'NM' have 1 sample; a stratified split needs "
                                        r"at least 2 per class"):
        split_sizes(np.array(["CT", "CT", "NM"]), 0.25, "labels.csv")
    with pytest.raises(DataError, match="only one class"):
        split_sizes(np.array(["CT"] * 4), 0.25, "labels.csv")
    with pytest.raises(DataError, match="too few for a stratified split"):
        split_sizes(np.array(["a", "a", "b", "b", "c", "c"]), 0.6, "labels.csv")
    # 10 samples, 5 classes: a quarter would be 3 test samples, raised to one per class
    assert split_sizes(np.repeat(np.array(list("abcde")), 2), 0.25, "l") == (5, 5)


def test_labels_match_stored_or_base_names(tmp_path):
    X, y, names = _blobs(n_per=3)
    labels = {n if i % 2 else n.split("/")[-1]: l for i, (n, l) in enumerate(zip(names, y))}
    emb, csv = _write(tmp_path, X, names, labels)
    from medlite.embeddings.store import read_embeddings

    Xm, ym, got = match_labels(read_embeddings(emb), read_labels(csv), labels_path=csv, emb_path=emb,
                               ctx=RunContext(quiet=True))
    assert got == names and list(ym) == list(y)
    np.testing.assert_array_equal(Xm, X)


def test_label_file_errors(tmp_path):
    X, y, names = _blobs(n_per=3)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,class\na.png,CT\n")
    with pytest.raises(DataError, match=r"bad\.csv: needs the columns file,label \(missing file, label; found image, class\)"):
        read_labels(bad)
    bad.write_text("file,label\na.png,CT\na.png,MR\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: a\.png is labelled both 'CT' and 'MR'"):
        read_labels(bad)
    bad.write_text("file,label\na.png,\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2: empty label"):
        read_labels(bad)
    with pytest.raises(DataError, match="labels file not found"):
        read_labels(tmp_path / "nope.csv")


def test_cli_errors_are_one_line(tmp_path, cli):
    X, y, names = _blobs(n_per=3)
    labels = dict(zip(names, y))
    emb, csv = _write(tmp_path, X, names, {**labels, "ghost.png": "CT"})
    code, out, err, _ = cli("probe", "--embeddings", emb, "--labels", csv)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {csv}: 1 file(s) are not in {emb}: ghost.png "
                                        f"(it has e.g. {', '.join(names[:3])})"]
    emb, csv = _write(tmp_path, X, names, {**labels, names[0]: "NM"})
    code, out, err, _ = cli("probe", "--embeddings", emb, "--labels", csv)
    assert code == 2 and "class(es) 'NM' have 1 sample" in err and len(err.strip().splitlines()) == 1


def test_cli_json_and_out_file(tmp_path, cli):
    import json

    X, y, names = _blobs()
    emb, csv = _write(tmp_path, X, names, dict(zip(names[:-1], y[:-1])))    # one embedded image unlabelled
    code, out, err, res = cli("probe", "--embeddings", emb, "--labels", csv, "--json", "--out", tmp_path / "r.json")
    assert code == 0, err
    assert "1 embedded image(s) have no label" in err
    assert res["samples"] == 29 and res["beats_baseline"] is True
    assert json.loads((tmp_path / "r.json").read_text())["probe"]["accuracy"] == res["probe"]["accuracy"]
    code, out, err, _ = cli("probe", "--embeddings", emb, "--labels", csv)
    assert code == 0 and "beats the majority-class baseline" in out and "macro-F1" in out


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MedliteError, match=r"needs scikit-learn.*pip install medlite\[probe\]"):
        sklearn_modules()
