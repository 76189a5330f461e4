"""``medlite probe``: a logistic-regression probe on image embeddings, beside a majority-class baseline.

The metrics are the ones the low-resource embeddings literature reports for CPU classifiers:
accuracy, macro-F1, training time, inference time and memory. scikit-learn is an optional extra
(``pip install medlite[probe]``), imported only when the probe runs.
"""
from __future__ import annotations

import csv
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from medlite.embeddings.store import EmbeddingSet
from medlite.errors import DataError, MedliteError

INSTALL_HINT = "pip install medlite[probe]"


def sklearn_modules():
    """scikit-learn's pieces, or one line saying how to install it."""
    try:
        from sklearn.dummy import DummyClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise MedliteError(f"medlite probe needs scikit-learn, which is not installed: {INSTALL_HINT}") from None
    return {"DummyClassifier": DummyClassifier, "LogisticRegression": LogisticRegression,
            "accuracy_score": accuracy_score, "f1_score": f1_score, "train_test_split": train_test_split,
            "make_pipeline": make_pipeline, "StandardScaler": StandardScaler}


def read_labels(path) -> dict[str, str]:
    """``file -> label`` from a CSV with (at least) the columns ``file`` and ``label``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("file", "label") if c not in cols]
            if missing:
                raise DataError(f"{path}: needs the columns file,label (missing {', '.join(missing)}; "
                                f"found {', '.join(cols) or 'none'})")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    labels: dict[str, str] = {}
    for line, r in enumerate(rows, start=2):
        name, label = r.get("file", ""), r.get("label", "")
        if not name or not label:
            raise DataError(f"{path} line {line}: empty {'file' if not name else 'label'}")
        if labels.get(name, label) != label:
            raise DataError(f"{path} line {line}: {name} is labelled both {labels[name]!r} and {label!r}")
        labels[name] = label
    if not labels:
        raise DataError(f"{path}: no labelled rows")
    return labels


def match_labels(data: EmbeddingSet, labels: dict[str, str], *, labels_path, emb_path, ctx):
    """``(X, y, names)`` for the labelled images. Labels are matched by the stored name, or by its
    base name when that is unique in the embeddings file. Unknown files in labels.csv are an error;
    embedded images without a label are left out with a warning."""
    by_name = {f: i for i, f in enumerate(data.files)}
    base_counts = Counter(Path(f).name for f in data.files)
    by_base = {Path(f).name: i for i, f in enumerate(data.files) if base_counts[Path(f).name] == 1}
    rows, unknown = {}, []
    for name, label in labels.items():
        i = by_name.get(name, by_base.get(name))
        if i is None:
            unknown.append(name)
        else:
            rows[i] = label
    if unknown:
        raise DataError(f"{labels_path}: {len(unknown)} file(s) are not in {emb_path}: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''} (it has e.g. {', '.join(data.files[:3])})")
    left = len(data.files) - len(rows)
    if left:
        ctx.warn(f"{left} embedded image(s) have no label in {labels_path} and are left out")
    idx = sorted(rows)
    return data.vectors[idx], np.array([rows[i] for i in idx]), [data.files[i] for i in idx]


def split_sizes(y: np.ndarray, test_size: float, labels_path) -> tuple[int, int]:
    """(train, test) counts of a stratified split: every class needs >= 2 samples, and both sides at
    least one sample per class (so the test count is raised to the number of classes if needed)."""
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise DataError(f"{labels_path}: only one class ({next(iter(counts))!r}); a probe needs at least two")
    few = sorted(c for c, n in counts.items() if n < 2)
    if few:
        raise DataError(f"{labels_path}: class(es) {', '.join(map(repr, few))} have 1 sample; a stratified "
                        f"split needs at least 2 per class (add images or leave those rows out)")
    if not 0 < test_size < 1:
        raise DataError(f"--test-size must be between 0 and 1, got {test_size}")
    n, k = len(y), len(counts)
    n_test = max(k, math.ceil(test_size * n))
    if n - n_test < k:
        raise DataError(f"{labels_path}: {n} samples in {k} classes are too few for a stratified split with "
                        f"--test-size {test_size} (each side needs one sample per class)")
    return n - n_test, n_test


def _scores(sk, y_true, y_pred) -> dict:
    return {"accuracy": float(sk["accuracy_score"](y_true, y_pred)),
            "macro_f1": float(sk["f1_score"](y_true, y_pred, average="macro", zero_division=0))}


def run_probe(X: np.ndarray, y: np.ndarray, *, test_size: float, seed: int, c: float, max_iter: int,
              labels_path="labels.csv", threads: int = 1) -> dict:
    """Train the probe (standardised features → multinomial logistic regression) on a stratified,
    seeded split; score it and a majority-class baseline on the held-out side.

    ``threads`` caps the BLAS/OpenMP pools (threadpoolctl, a scikit-learn dependency): a probe's
    matrices are tiny, and on a busy 2-core machine two BLAS threads made one fit 25x slower
    (0.9 s vs 0.036 s for 9 x 128 features, 47 lbfgs iterations; docs/cpu.md)."""
    sklearn_modules()                     # the install hint first (threadpoolctl comes with scikit-learn)
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise DataError(f"--threads must be at least 1, got {threads}")
    with threadpool_limits(limits=threads):
        res = _fit_and_score(X, y, test_size=test_size, seed=seed, c=c, max_iter=max_iter, labels_path=labels_path)
    res["threads"] = threads
    return res


def _fit_and_score(X, y, *, test_size: float, seed: int, c: float, max_iter: int, labels_path) -> dict:
    from medlite.bench.measure import peak_rss_bytes

    sk = sklearn_modules()
    n_train, n_test = split_sizes(y, test_size, labels_path)
    if c <= 0 or max_iter < 1:
        raise DataError(f"--c must be > 0 and --max-iter >= 1 (got {c}, {max_iter})")
    X_tr, X_te, y_tr, y_te = sk["train_test_split"](X, y, test_size=n_test, stratify=y, random_state=seed)
    # Standardising first: embeddings from different layers differ in scale by orders of magnitude,
    # and an unscaled L2 penalty would then mean something different for each.
    probe = sk["make_pipeline"](sk["StandardScaler"](), sk["LogisticRegression"](C=c, max_iter=max_iter))
    t0 = time.perf_counter()
    probe.fit(X_tr, y_tr)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = probe.predict(X_te)
    infer_s = time.perf_counter() - t1
    base = sk["DummyClassifier"](strategy="most_frequent").fit(X_tr, y_tr)
    scaler, lr = probe[0], probe[-1]
    # what a deployed probe keeps: the scaler's statistics and the classifier's weights
    model_bytes = sum(int(a.nbytes) for a in (scaler.mean_, scaler.scale_, lr.coef_, lr.intercept_))
    result = {"probe": {"model": f"StandardScaler + LogisticRegression(C={c}, lbfgs)", **_scores(sk, y_te, pred),
                        "train_s": train_s, "inference_s": infer_s,
                        "inference_ms_per_image": infer_s * 1e3 / len(y_te),
                        "model_bytes": model_bytes,
                        "converged": bool(np.all(np.asarray(lr.n_iter_) < max_iter))},
              "baseline": {"model": f"majority class ({str(base.classes_[np.argmax(base.class_prior_)])!r} in "
                                    f"the training split)", **_scores(sk, y_te, base.predict(X_te))},
              "samples": int(len(y)), "train": n_train, "test": n_test, "dim": int(X.shape[1]),
              "classes": dict(sorted(Counter(y.tolist()).items())), "seed": seed, "test_size": test_size}
    result["beats_baseline"] = (result["probe"]["accuracy"] > result["baseline"]["accuracy"]
                                and result["probe"]["macro_f1"] > result["baseline"]["macro_f1"])
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
