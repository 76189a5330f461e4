"""medlite's device runtime (runs on the Jetson): TensorRT 8.5 engines, or ONNX Runtime stand-ins.

Python 3.8, no torch, no medlite: only the standard library, numpy, tokenizers, Pillow, onnxruntime,
and on the device ``tensorrt`` (JetPack 5.1) + ``cuda-python``. The prompt, preprocessing and greedy
decoding code is medlite's own ONNX Runtime path, copied into ``mlrt/`` when the bundle is made.
"""
