"""Image embeddings for downstream classifiers: ``medlite embed`` and ``medlite probe``.

* :mod:`medlite.embeddings.pooling` — token features ``[B, T, H]`` → one vector per image (numpy);
* :mod:`medlite.embeddings.store` — the embeddings file (``.npz`` always, ``.parquet`` with pyarrow),
  written atomically, with the model identity, pooling and preprocessing in its metadata;
* :mod:`medlite.embeddings.encoders` — image → token features: ONNX Runtime for an artifact or
  export (torch-free, ``vision.onnx`` only), PyTorch for a checkpoint;
* :mod:`medlite.embeddings.probe` — a logistic-regression probe (scikit-learn, optional extra
  ``medlite[probe]``) with a stratified split and a majority-class baseline;
* :mod:`medlite.embeddings.commands` — the two CLI handlers.

Nothing here imports torch at module level; only the checkpoint encoder does, when it runs.
"""

# The option vocabularies, here so the CLI's parser can name them without importing numpy.
POOLS = ("mean", "max", "first")          # --pool
SOURCES = ("projector", "vision")         # --from
