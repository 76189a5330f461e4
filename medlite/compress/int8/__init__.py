"""INT8 for TensorRT 8.5: SmoothQuant on the language model, static Q/DQ graph passes calibrated on the
recipe's medical calibration set, per-layer sensitivity fallback to fp16. Entry point:
:func:`medlite.compress.int8.stage.apply_int8`. Heavy libraries (torch, llmcompressor, onnxruntime)
are imported inside the functions that need them."""
