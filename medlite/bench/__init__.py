"""``medlite bench``: latency and throughput of an artifact (ONNX Runtime) or a checkpoint (PyTorch) here."""
