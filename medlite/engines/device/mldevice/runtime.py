"""``DeviceVlm``: medlite's ONNX Runtime VLM (``mlrt.vlm.OnnxVlm``) with its graph calls on engines.

Only the three graph calls change; preprocessing, the prompt, the image splice, greedy decoding with
streaming (``greedy_generate``) and answer cleaning are medlite's own code, copied into ``mlrt/``.

* vision: the vision engine (or its stand-in) → image embeddings;
* token embeddings: ``embed_tokens.bin`` read directly (memory-mapped table);
* decoder: ONE engine with two optimisation profiles, ``prefill`` and ``decode``, selected per call;
  the KV cache lives in two sets of buffers allocated once at the decode profile's maximum context
  and swapped every step (step t reads past from one set and writes present into the other), so the
  cache never travels to the host and is never reallocated;
* INT4 bundles: the decoder (MatMulNBits, which TensorRT 8.5 cannot run) on ONNX Runtime.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mlrt.config import RuntimeConfig
from mlrt.errors import DataError
from mlrt.vlm import OnnxVlm

from mldevice.backends import (CudaBuffer, HostBuffer, ProfileError, StandinEngine, TrtEngine, load_cuda,
                               profile_problem, read_engines_spec)

DEVICE_DIR = "device"     # the artifact's declared device-built folder (manifest "device_files")


class KvHandle:
    """The cache after a call: which buffer set holds it and how many slots (returned as ``presents``)."""

    def __init__(self, which: int, batch: int, slots: int):
        self.which, self.batch, self.slots = which, batch, slots


class EngineDecoder:
    """``run_decoder`` for ``greedy_generate`` on a two-profile decoder engine (or its stand-in)."""

    def __init__(self, engine, cfg: RuntimeConfig, new_buffer):
        self.engine, self.cfg = engine, cfg
        m = cfg.model
        self.layers, self.kvh, self.hd = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        self.past_names = [cfg.past_name(i, k) for i in range(self.layers) for k in ("key", "value")]
        self.present_names = [cfg.present_name(i, k) for i in range(self.layers) for k in ("key", "value")]
        self.prefill_slots = int(cfg.kv_cache["prefill_past_slots"])
        names = list(engine.profile_names)
        self.p_prefill = names.index("prefill") if "prefill" in names else 0
        self.p_decode = names.index("decode") if "decode" in names else 0
        pre, dec = engine.profile_bounds(self.p_prefill), engine.profile_bounds(self.p_decode)
        self.max_batch = int(pre["inputs_embeds"]["max"][0])
        self.max_seq = int(pre["inputs_embeds"]["max"][1])
        self.max_past = int(dec[self.past_names[0]]["max"][2])
        hidden, vocab = int(pre["inputs_embeds"]["max"][2]), m["vocab_size"]
        b, total = self.max_batch, max(self.max_past + 1, self.prefill_slots + self.max_seq)
        dt = engine.dtype
        # Every buffer is allocated here, once, at the profiles' maxima (nothing grows per step).
        self.buf = {"inputs_embeds": new_buffer(b * self.max_seq * hidden * np.dtype(dt("inputs_embeds")).itemsize,
                                                dt("inputs_embeds")),
                    "attention_mask": new_buffer(b * total * 4, np.int32),
                    "position_ids": new_buffer(b * self.max_seq * 4, np.int32),
                    "logits": new_buffer(b * self.max_seq * vocab * np.dtype(dt("logits")).itemsize, dt("logits"))}
        kv_bytes = b * self.kvh * total * self.hd * np.dtype(dt(self.present_names[0])).itemsize
        self.kv = [[new_buffer(kv_bytes, dt(n)) for n in self.present_names] for _ in range(2)]
        self.vocab = vocab
        self.profile_log: list = []     # the profile of every call (tests: one switch per question)
        self.switches = 0
        self._active = None

    def _limit_error(self, phase: str, problem: str) -> ProfileError:
        n_img = self.cfg.num_image_tokens
        if phase == "prefill":
            return ProfileError(
                f"the prompt does not fit the decoder engine's prefill profile ({problem}): at most "
                f"{self.max_seq} tokens ({n_img} image + {self.max_seq - n_img} text); rebuild the artifact "
                f"with a larger engines option max_prompt_tokens (recipe: stages -> engines -> max_prompt_tokens, "
                f"now {self.max_seq - n_img}), or ask a shorter question")
        return ProfileError(
            f"the answer does not fit the decoder engine's decode profile ({problem}): the context holds at "
            f"most {self.max_past} past tokens; use fewer --max-new-tokens or rebuild with a larger engines "
            f"option max_new_tokens (recipe: stages -> engines -> max_new_tokens)")

    def _select(self, phase: str) -> None:
        index = self.p_prefill if phase == "prefill" else self.p_decode
        self.profile_log.append(phase)
        if self._active != index:
            if self._active is not None:
                self.switches += 1
            self.engine.select_profile(index)
            self._active = index

    def __call__(self, x, mask, pos, past):
        b, seq = int(x.shape[0]), int(x.shape[1])
        if isinstance(past, KvHandle):
            src, slots = past.which, past.slots
        else:   # first call: the host-side dummy slot(s) from prefill_inputs, uploaded once
            src, slots = 0, int(past[0].shape[2])
            for buf, arr in zip(self.kv[0], past):
                buf.upload(np.ascontiguousarray(arr))
        phase = "prefill" if slots == self.prefill_slots else "decode"
        self._select(phase)
        bounds = self.engine.profile_bounds(self._active)
        past_shape = (b, self.kvh, slots, self.hd)
        shapes = {"inputs_embeds": tuple(x.shape), "attention_mask": tuple(mask.shape),
                  "position_ids": tuple(pos.shape)}
        shapes.update({n: past_shape for n in self.past_names})
        for name, shape in shapes.items():
            if not self.engine.set_input_shape(name, shape):
                raise self._limit_error(phase, profile_problem(bounds, name, list(shape)) or f"{name} {shape}")
        dt = self.engine.dtype
        self.buf["inputs_embeds"].upload(np.ascontiguousarray(x, dtype=dt("inputs_embeds")))
        self.buf["attention_mask"].upload(np.ascontiguousarray(mask, dtype=np.int32))
        self.buf["position_ids"].upload(np.ascontiguousarray(pos, dtype=np.int32))
        for name in ("inputs_embeds", "attention_mask", "position_ids"):
            self.engine.bind(name, self.buf[name], shapes[name])
        dst = 1 - src
        present_shape = (b, self.kvh, slots + seq, self.hd)
        for name, buf in zip(self.past_names, self.kv[src]):
            self.engine.bind(name, buf, past_shape)
        for name, buf in zip(self.present_names, self.kv[dst]):
            self.engine.bind(name, buf, present_shape)
        self.engine.bind("logits", self.buf["logits"], (b, seq, self.vocab))
        self.engine.execute()
        logits = self.buf["logits"].download((b, seq, self.vocab))[:, -1:, :]
        return logits, KvHandle(dst, b, slots + seq)


class EngineVision:
    """The vision engine behind the ``session.run`` call ``OnnxVlm`` makes."""

    def __init__(self, engine, cfg: RuntimeConfig, new_buffer):
        self.engine, self.cfg = engine, cfg
        bounds = engine.profile_bounds(0)["pixel_values"]
        self.max_batch = int(bounds["max"][0])
        self.out_shape = (cfg.num_image_tokens, cfg.model["hidden_size"])
        dt = engine.dtype
        self.pixels = new_buffer(int(np.prod(bounds["max"])) * np.dtype(dt("pixel_values")).itemsize, dt("pixel_values"))
        self.out = new_buffer(self.max_batch * int(np.prod(self.out_shape)) * np.dtype(dt("image_embeds")).itemsize,
                              dt("image_embeds"))

    def run(self, output_names, feed):
        """``[image_embeds]`` for ``feed["pixel_values"]``, in chunks of the profile's maximum batch."""
        px = feed["pixel_values"]
        chunks = [self._run(px[i:i + self.max_batch]) for i in range(0, px.shape[0], self.max_batch)]
        return [np.concatenate(chunks, axis=0)]

    def _run(self, px):
        self.engine.select_profile(0)
        if not self.engine.set_input_shape("pixel_values", px.shape):
            raise ProfileError(f"pixel_values {tuple(px.shape)}: outside the vision engine's profile "
                               f"({profile_problem(self.engine.profile_bounds(0), 'pixel_values', list(px.shape))})")
        self.pixels.upload(np.ascontiguousarray(px, dtype=self.engine.dtype("pixel_values")))
        shape = (px.shape[0],) + self.out_shape
        self.engine.bind("pixel_values", self.pixels, px.shape)
        self.engine.bind("image_embeds", self.out, shape)
        self.engine.execute()
        return self.out.download(shape)


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


class DeviceVlm(OnnxVlm):
    """``OnnxVlm`` whose vision and decoder calls run on engines (TensorRT or the stand-in)."""

    def _decoder(self, x, mask, pos, past):
        if self.engine_decoder is not None:
            return self.engine_decoder(x, mask, pos, past)
        return OnnxVlm._decoder(self, x, mask, pos, past)

    def check_prompt(self, questions, max_new_tokens: int) -> None:
        """Refuse up front a prompt or an answer length that the engine profiles cannot hold."""
        dec = self.engine_decoder
        if dec is None:
            return
        for q in questions:
            n = len(self.prompt_ids(q))
            if n > dec.max_seq:
                raise dec._limit_error("prefill", f"this prompt has {n} tokens")
            last_past = dec.prefill_slots + n + max_new_tokens - 2
            if max_new_tokens > 1 and last_past > dec.max_past:
                raise dec._limit_error("decode", f"{n} prompt tokens + {max_new_tokens} new tokens need "
                                                 f"{last_past} past slots")

    def generate_ids(self, images, questions, *, max_new_tokens: int = 32, on_step=None):
        self.check_prompt(list(questions), max_new_tokens)
        return OnnxVlm.generate_ids(self, images, questions, max_new_tokens=max_new_tokens, on_step=on_step)

    @property
    def backend(self) -> dict:
        """What runs each part (printed by every command)."""
        return dict(self.runs)


def _open_engine(kind: str, folder: Path, spec_engine: dict, cfg: RuntimeConfig, trt, cuda):
    name = spec_engine["name"]
    if kind == "standin":
        g = cfg.graphs[name]
        level = "basic" if g.quantization else "all"
        return StandinEngine(folder / g.file, spec_engine["profiles"], optimization=level)
    path = folder / DEVICE_DIR / spec_engine["engine"]
    if not path.is_file():
        raise SystemExit(f"{path}: engine not built yet: run `python3 medlite_device.py build` on the Jetson "
                         "(or use --standin to run the ONNX graphs on ONNX Runtime)")
    return TrtEngine(path, spec_engine["profiles"], trt, cuda)


def open_device_vlm(folder, *, standin: bool = False) -> DeviceVlm:
    """Open an artifact folder for the device: engines from ``device/``, or stand-ins of the same graphs."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    cfg = RuntimeConfig.load(folder)
    spec = read_engines_spec(folder)
    tokenizer = Tokenizer.from_file(str(folder / cfg.tokenizer_file))
    trt = cuda = None
    if standin:
        new_buffer = HostBuffer
    else:
        try:
            import tensorrt as trt
        except ImportError:
            raise SystemExit("the TensorRT Python bindings are missing (JetPack 5.1: python3-libnvinfer); "
                             "--standin runs the same graphs on ONNX Runtime without a GPU") from None
        cuda = load_cuda()

        def new_buffer(nbytes, dtype):
            return CudaBuffer(nbytes, dtype, cuda[0], cuda[1])
    engines = {e["name"]: e for e in spec["engines"]}
    kind = "standin" if standin else "tensorrt"
    runs, sessions, providers = {}, {}, {}
    vision = EngineVision(_open_engine(kind, folder, engines["vision"], cfg, trt, cuda), cfg, new_buffer)
    sessions["vision"], providers["vision"] = vision, [kind]
    runs["vision"] = "ONNX Runtime stand-in of the vision engine" if standin else "TensorRT vision.engine"
    decoder = None
    if "decoder" in engines:
        decoder = EngineDecoder(_open_engine(kind, folder, engines["decoder"], cfg, trt, cuda), cfg, new_buffer)
        runs["decoder"] = ("ONNX Runtime stand-in of the decoder engine (profiles enforced)" if standin
                           else "TensorRT decoder.engine (profiles prefill/decode)")
        providers["decoder"] = [kind]
    else:   # INT4: MatMulNBits runs only on ONNX Runtime
        from mlrt.sessions import default_providers, open_session

        g = cfg.graphs["decoder"]
        sess, used = open_session(folder / g.file, default_providers(),
                                  optimization="basic" if g.quantization else "all")
        sessions["decoder"], providers["decoder"] = sess, used
        runs["decoder"] = f"ONNX Runtime ({', '.join(used)}): {g.runtime_reason or 'not a TensorRT graph'}"
        if used == ["CPUExecutionProvider"]:
            say("NOTE: the decoder runs on ONNX Runtime's CPU execution provider (no CUDA provider in this "
                "onnxruntime build): slow. INT4 (MatMulNBits) needs onnxruntime >= 1.17 built with CUDA for sm_72.")
    t = cfg.embedding_table
    table = np.memmap(folder / t["file"], dtype=np.dtype(t["dtype"]), mode="r", offset=int(t.get("offset", 0)),
                      shape=tuple(t["shape"]))
    runs["embed"] = f"{t['file']} (memory-mapped table)"
    vlm = DeviceVlm(folder, cfg, tokenizer, sessions, providers, table=table)
    vlm.engine_decoder, vlm.runs = decoder, runs
    if decoder is not None:
        vlm._bound = None
    return vlm


__all__ = ["DataError", "DeviceVlm", "EngineDecoder", "KvHandle", "open_device_vlm"]
