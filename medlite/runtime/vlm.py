"""``OnnxVlm``: answer questions about images with the exported graphs on ONNX Runtime (no torch).

Pipeline per question: preprocess (``medlite.preprocess``, the same code as the PyTorch path) →
``vision.onnx`` → token embeddings (``embed.onnx``, or the raw ``embed_tokens.bin`` table) with the
image embeddings spliced in at the expanded ``<image>`` positions → ``decoder.onnx`` with the KV
cache → greedy decoding that never emits the image token and stops at EOS or a template stop string.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from medlite.errors import DataError
from medlite.preprocess import preprocess
from medlite.prompting import clean_answer, encode_prompt, expand_image_tokens
from medlite.runtime.config import RuntimeConfig
from medlite.runtime.decoding import BoundDecoder, greedy_generate, prefill_inputs
from medlite.runtime.limits import check_request, limits_for
from medlite.runtime.sessions import open_session


def load_input_image(image, ctx=None):
    """A PIL image as is; a path through medlite's DICOM-aware loader (PIL if it is unavailable)."""
    if hasattr(image, "convert"):
        return image
    path = Path(image)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        from medlite.imaging.images import load_image
    except ImportError:  # a runtime-only install without the calibration package
        from PIL import Image

        return Image.open(path).convert("RGB")
    return load_image(path, ctx=ctx)


class OnnxVlm:
    """A loaded ONNX export. Use :meth:`open`."""

    def __init__(self, folder: Path, config: RuntimeConfig, tokenizer, sessions: dict, providers: dict,
                 *, table: Optional[np.ndarray], ctx=None, warnings: Optional[list] = None):
        self.folder, self.config, self.tokenizer = folder, config, tokenizer
        self.sessions, self.providers, self.ctx = sessions, providers, ctx
        self.table = table
        self._byte_token_ids: Optional[set[int]] = None
        self.warnings = warnings if warnings is not None else []
        # Follow-up questions: a ``medlite.runtime.prefix_cache.PrefixCache`` makes :meth:`answer` reuse an
        # image's prompt-prefix KV cache (None: every question is prefilled whole). ``last_prefill``: what
        # the last :meth:`answer` prefilled (``prefill_tokens``, ``cached_tokens``, ``cache``).
        self.prefix_cache = None
        self.last_prefill: dict = {}
        # Maximum positions and the engines' profile bounds: every request is checked before it runs.
        self.limits = limits_for(folder, config)
        dec = config.graphs["decoder"]
        self._embed_dtype = np.dtype(dec.input("inputs_embeds").dtype)
        self._kv_dtype = np.dtype(config.kv_cache["dtype"])
        self._past_names = [config.past_name(i, k) for i in range(config.model["num_layers"]) for k in ("key", "value")]
        self._present_names = [config.present_name(i, k) for i in range(config.model["num_layers"])
                               for k in ("key", "value")]
        # On the CPU EP the KV cache is bound to pre-allocated buffers (no per-step copies; docs/cpu.md).
        self._bound = BoundDecoder(sessions["decoder"], self._past_names, self._present_names,
                                   embed_dtype=self._embed_dtype, kv_dtype=self._kv_dtype) \
            if list(providers.get("decoder", ())) == ["CPUExecutionProvider"] else None

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, providers: Optional[Sequence] = None, *, ctx=None, embed_source: str = "onnx") -> "OnnxVlm":
        """Read ``medlite_runtime.json`` + ``tokenizer.json`` and create the sessions.

        ``providers``: ONNX Runtime execution providers (default: CUDA when this build has it, then
        CPU). Providers that were asked for but are not in use are reported loudly; see
        :attr:`providers` for what each graph really runs on. ``embed_source`` is ``"onnx"``
        (``embed.onnx``) or ``"table"`` (memory-mapped ``embed_tokens.bin``, no session).
        """
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg = RuntimeConfig.load(folder)
        tok_path = folder / cfg.tokenizer_file
        if not tok_path.is_file():
            raise DataError(f"{tok_path}: tokenizer file named in medlite_runtime.json is missing")
        tokenizer = Tokenizer.from_file(str(tok_path))
        if embed_source not in ("onnx", "table"):
            raise DataError(f"embed_source {embed_source!r}: use 'onnx' or 'table'")
        needed = ["vision", "decoder"] + (["embed"] if embed_source == "onnx" else [])
        missing = [g for g in needed if g not in cfg.graphs]
        if missing:
            raise DataError(f"{folder / 'medlite_runtime.json'}: graphs {missing} are not in this export")
        warnings: list[str] = []
        sessions, used = {}, {}
        for name in needed:
            # A quantized graph runs exactly as written (no ORT integer fusions): see runtime/sessions.py.
            level = "basic" if cfg.graphs[name].quantization else "all"
            sessions[name], used[name] = open_session(folder / cfg.graphs[name].file, providers, ctx=ctx,
                                                      warnings=warnings, optimization=level)
        table = None
        if embed_source == "table":
            t = cfg.embedding_table
            if not t.get("file"):
                raise DataError(f"{folder / 'medlite_runtime.json'}: embedding_table has no file")
            table = np.memmap(folder / t["file"], dtype=np.dtype(t["dtype"]), mode="r",
                              offset=int(t.get("offset", 0)), shape=tuple(t["shape"]))
        return cls(folder, cfg, tokenizer, sessions, used, table=table, ctx=ctx, warnings=warnings)

    # -- graph calls ----------------------------------------------------------------------
    def _vision(self, images: list) -> np.ndarray:
        return self._vision_pixels(self._pixels(images))

    def _pixels(self, images: list) -> np.ndarray:
        return preprocess([load_input_image(im, self.ctx) for im in images], self.config.image_spec)

    def _vision_pixels(self, pixels: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.config.graphs["vision"].input("pixel_values").dtype)
        (emb,) = self.sessions["vision"].run(["image_embeds"], {"pixel_values": pixels.astype(dtype)})
        return emb

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32)
        if self.table is not None:
            return np.asarray(self.table[ids], dtype=self._embed_dtype)
        (out,) = self.sessions["embed"].run(["inputs_embeds"], {"input_ids": ids})
        return out.astype(self._embed_dtype, copy=False)

    def _decoder(self, x, mask, pos, past):
        if self._bound is not None:
            return self._bound(x, mask, pos, past)
        feed = {"inputs_embeds": x.astype(self._embed_dtype, copy=False), "attention_mask": mask,
                "position_ids": pos}
        feed.update({n: p.astype(self._kv_dtype, copy=False) for n, p in zip(self._past_names, past)})
        outs = self.sessions["decoder"].run(["logits", *self._present_names], feed)
        return outs[0], list(outs[1:])

    # -- prompts --------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the rendered prompt, ``<image>`` expanded to one id per image embedding."""
        c = self.config
        ids = encode_prompt(self.tokenizer, c.template.render(question), image_token_id=c.image_token_id,
                            bos_token_id=c.bos_token_id)
        return expand_image_tokens(ids, c.image_token_id, c.num_image_tokens)

    def _prompt_embeds(self, ids: list[int], image_emb: np.ndarray) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int32)
        emb = self._embed(arr[None])[0].copy()
        where = np.flatnonzero(arr == self.config.image_token_id)
        if len(where) != image_emb.shape[0]:
            raise DataError(f"prompt has {len(where)} image positions but the vision graph gave "
                            f"{image_emb.shape[0]} embeddings")
        emb[where] = image_emb.astype(emb.dtype)
        return emb

    def check_request(self, questions: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """The questions' prompt ids, after refusing a request past the context limits (:mod:`.limits`)."""
        ids = [self.prompt_ids(q) for q in questions]
        check_request(self.limits, [len(i) for i in ids], max_new_tokens)
        return ids

    def _first(self, images: list, questions: list[str], max_new_tokens: int = 0):
        if len(images) != len(questions):
            raise DataError(f"{len(images)} images but {len(questions)} questions")
        ids = self.check_request(questions, max_new_tokens)   # before any graph runs
        vis = self._vision(images)
        rows = [self._prompt_embeds(row, vis[i]) for i, row in enumerate(ids)]
        m = self.config.model
        return prefill_inputs(rows, num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"],
                              head_dim=m["head_dim"], dtype=self._kv_dtype,
                              prefill_slots=int(self.config.kv_cache["prefill_past_slots"]))

    # -- public API -----------------------------------------------------------------------
    def image_embeddings(self, image) -> np.ndarray:
        """``[num_image_tokens, hidden]`` float32 embeddings after the projector."""
        return self._vision([image])[0].astype(np.float32)

    def first_token_logits(self, image, question: str) -> np.ndarray:
        """``[vocab]`` float32 logits of the first answer token (nothing suppressed)."""
        x, pos, state = self._first([image], [question])
        logits, _ = self._decoder(x, state.mask, pos, state.past)
        return logits[0, -1].astype(np.float32)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 32,
                     on_step: Optional[Callable] = None) -> list[list[int]]:
        """Greedy answer token ids for (image, question) pairs in one left-padded batch (stop ids excluded)."""
        first = self._first(list(images), list(questions), max_new_tokens)
        return self._greedy(first, max_new_tokens=max_new_tokens, on_step=on_step)

    def _greedy(self, first: tuple, *, max_new_tokens: int, run: Optional[Callable] = None,
                on_step: Optional[Callable] = None) -> list[list[int]]:
        """:func:`greedy_generate` from ``first`` with this export's stop ids, stop strings and suppressed ids."""
        c = self.config
        stops = tuple(s for s in c.template.stop if s)

        def is_stopped(_row: int, ids: list[int]) -> bool:
            text = self._text(ids)
            return any(s in text for s in stops)

        return greedy_generate(run or self._decoder, self._embed, first, max_new_tokens=max_new_tokens,
                               stop_ids=set(c.eos_token_ids), suppress_ids=list(c.suppress_token_ids),
                               is_stopped=is_stopped, on_step=on_step)

    def answer_batch(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 32,
                     on_step: Optional[Callable] = None) -> list[str]:
        """Greedy answers for several (image, question) pairs in one left-padded batch."""
        stops = tuple(s for s in self.config.template.stop if s)
        gen = self.generate_ids(images, questions, max_new_tokens=max_new_tokens, on_step=on_step)
        return [clean_answer(self._text(ids), stops) for ids in gen]

    def evaluate_rows(self, images: Sequence, image_index: Sequence[int], questions: Sequence[str], *,
                      max_new_tokens: int = 16):
        """Everything the gates need about a batch of questions, each image encoded once.

        Row ``i`` asks ``questions[i]`` about ``images[image_index[i]]``. Returns ``(answers,
        first_token_logits [rows, vocab] float32, image_embeddings [len(images), n_img, hidden]
        float32)``; the rows run as one left-padded batch, and the first-token logits come from the
        same prefill that starts the answers (nothing is computed twice).
        """
        questions = list(questions)
        if not questions or len(image_index) != len(questions):
            raise DataError(f"evaluate_rows: {len(questions)} questions, {len(image_index)} image indices")
        ids = self.check_request(questions, max_new_tokens)   # before any graph runs
        emb = self._vision(list(images))
        rows = [self._prompt_embeds(row, emb[j]) for row, j in zip(ids, image_index)]
        m = self.config.model
        first = prefill_inputs(rows, num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"],
                               head_dim=m["head_dim"], dtype=self._kv_dtype,
                               prefill_slots=int(self.config.kv_cache["prefill_past_slots"]))
        captured: list[np.ndarray] = []

        def run(x, mask, pos, past):
            logits, present = self._decoder(x, mask, pos, past)
            if not captured:
                captured.append(np.asarray(logits[:, -1], dtype=np.float32).copy())
            return logits, present

        c = self.config
        stops = tuple(s for s in c.template.stop if s)
        ids = greedy_generate(run, self._embed, first, max_new_tokens=max_new_tokens,
                              stop_ids=set(c.eos_token_ids), suppress_ids=list(c.suppress_token_ids),
                              is_stopped=lambda _r, g: any(s in self._text(g) for s in stops))
        answers = [clean_answer(self._text(g), stops) for g in ids]
        return answers, captured[0], emb.astype(np.float32)

    def _byte_ids(self) -> set[int]:
        """Byte-fallback tokens (``<0x41>``): a run of them decodes only once it is complete."""
        if self._byte_token_ids is None:
            self._byte_token_ids = {i for t, i in self.tokenizer.get_vocab().items()
                                    if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
        return self._byte_token_ids

    def _stable_text(self, ids: list[int], stops: tuple[str, ...]) -> str:
        """The part of the answer so far that later tokens cannot change (for streaming).

        Held back: a trailing run of byte tokens (an incomplete UTF-8 character decodes to U+FFFD
        and re-decodes differently), text from a stop string on, a suffix that could start a stop
        string, and surrounding whitespace (the final answer is stripped).
        """
        k = len(ids)
        while k and ids[k - 1] in self._byte_ids():
            k -= 1
        text = self._text(ids[:k])
        cut = min((text.index(s) for s in stops if s in text), default=None)
        if cut is not None:
            text = text[:cut]
        else:
            for s in stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        text = text[:-n]
                        break
        return text.strip()

    def answer(self, image, question: str, *, max_new_tokens: int = 32,
               on_token: Optional[Callable[[str], None]] = None, session=None) -> str:
        """Greedy answer to one question; ``on_token(text_piece)`` streams it (pieces join to the answer).

        With :attr:`prefix_cache` set, a follow-up question on the same image (in the same ``session``)
        prefills only its own tokens; :attr:`last_prefill` says what was prefilled.
        """
        stops = tuple(s for s in self.config.template.stop if s)
        shown = [""]

        def emit(text: str) -> None:
            if text.startswith(shown[0]) and len(text) > len(shown[0]):
                on_token(text[len(shown[0]):])
                shown[0] = text

        on_step = (lambda out: emit(self._stable_text(out[0], stops))) if on_token else None
        if self.prefix_cache is not None:
            ids, self.last_prefill = self.prefix_cache.generate(self, image, question, scope=session,
                                                                max_new_tokens=max_new_tokens, on_step=on_step)
            ans = clean_answer(self._text(ids), stops)
        else:
            (ans,) = self.answer_batch([image], [question], max_new_tokens=max_new_tokens, on_step=on_step)
            self.last_prefill = {"prefill_tokens": len(self.prompt_ids(question)), "cached_tokens": 0,
                                 "cache": "off"}
        if on_token:
            emit(ans)
        return ans
