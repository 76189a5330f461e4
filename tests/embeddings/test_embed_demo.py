"""Acceptance (issue 31) on the built-in demo model (from the user cache):

* ``medlite embed`` on real scans shipped in packages (pydicom, pydicom-data, scikit-image) writes one
  finite vector per image, through the checkpoint (PyTorch) and through its ONNX export (ONNX Runtime);
* ``medlite probe`` on embeddings of the built-in image set, labelled by modality, reports its metrics
  and beats the majority-class baseline.
"""
from __future__ import annotations

import csv
from collections import Counter

import numpy as np

from medlite.embeddings.store import read_embeddings


def test_demo_embeds_real_scans_both_runtimes(cli, tmp_path, demo_ckpt, demo_export, real_scans):
    vectors = {}
    for name, model in (("torch", demo_ckpt), ("onnx", demo_export)):
        out = tmp_path / f"{name}.npz"
        code, _, err, res = cli("embed", "--model", model, "--images", *real_scans, "--out", out, "--json")
        assert code == 0, err
        data = read_embeddings(out)
        assert data.files == [s.name for s in real_scans]
        assert data.vectors.ndim == 2 and data.vectors.shape[0] == len(real_scans)
        assert np.isfinite(data.vectors).all()
        assert res["images"] == len(real_scans) and res["images_per_s"] > 0
        vectors[name] = data.vectors
    np.testing.assert_allclose(vectors["onnx"], vectors["torch"], rtol=1e-3, atol=1e-4)


def _write_builtin_set(folder) -> dict[str, str]:
    """The built-in image set as PNG files (lossless: the same 8-bit RGB pixels); file -> modality."""
    from medlite.imaging.builtin import builtin_images

    folder.mkdir()
    labels = {}
    for im in builtin_images():
        name = im.image_id + (f"-f{im.frame}" if im.frame is not None else "") + ".png"
        im.load().save(folder / name)
        labels[name] = im.modality
    return labels


def _labels_csv(path, labels: dict[str, str]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(sorted(labels.items()))
    return path


def test_probe_on_builtin_modalities_beats_majority(cli, tmp_path, demo_export):
    labels = _write_builtin_set(tmp_path / "builtin")
    emb = tmp_path / "builtin.npz"
    code, _, err, _ = cli("embed", "--model", demo_export, "--images", tmp_path / "builtin", "--out", emb, "--json")
    assert code == 0, err
    assert sorted(read_embeddings(emb).files) == sorted(labels)

    # modalities with a single image cannot be split stratified: said in one line
    counts = Counter(labels.values())
    singles = sorted(m for m, n in counts.items() if n < 2)
    assert singles, counts
    code, _, err, _ = cli("probe", "--embeddings", emb, "--labels", _labels_csv(tmp_path / "all.csv", labels))
    assert code == 2 and f"class(es) {', '.join(map(repr, singles))} have 1 sample" in err

    kept = {f: m for f, m in labels.items() if counts[m] >= 2}
    code, _, err, res = cli("probe", "--embeddings", emb, "--labels", _labels_csv(tmp_path / "kept.csv", kept),
                            "--test-size", "0.4", "--json")
    assert code == 0, err
    assert "have no label" in err                         # the single-image modalities were left out, and said so
    p, b = res["probe"], res["baseline"]
    assert res["samples"] == len(kept) and res["test"] >= len(set(kept.values()))
    assert p["train_s"] > 0 and p["inference_s"] > 0 and p["model_bytes"] > 0 and res["peak_rss_bytes"] > 0
    assert p["accuracy"] > b["accuracy"] and p["macro_f1"] > b["macro_f1"], res
    assert res["beats_baseline"] is True
    assert res["embedding_model"]["kind"] == "onnx-export" and res["embedding"]["pool"] == "mean"
