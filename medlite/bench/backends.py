"""The two things ``medlite bench`` times: an ONNX artifact on ONNX Runtime, a checkpoint on PyTorch eager.

Each backend gives ``encode(image)`` and ``generate(image, question) -> RunTimes`` (timed with a
:class:`~medlite.bench.measure.StepClock`), ``answer_ids`` (the answer within the generated ids), its
runtime/precision/thread count, the prompt length and ``check`` (the context limit, before any run).

``generate`` makes exactly ``max_new_tokens`` tokens (a fixed count for the decode figure) unless
``stop_at_eos``: then it stops where the answer ends, as ``ask`` does (``ignore_eos`` never stops).
"""
from __future__ import annotations

from medlite.bench.measure import RunTimes, StepClock, answer_prefix


class OrtBackend:
    """An export / artifact folder through :class:`medlite.runtime.OnnxVlm` (torch-free)."""

    kind = "artifact"

    def __init__(self, folder, *, ctx, max_new_tokens: int, ignore_eos: bool, stop_at_eos: bool = False,
                 threads=None, vlm=None):
        from medlite.runtime import OnnxVlm
        from medlite.runtime.describe import precision_summary
        from medlite.runtime.sessions import physical_cores

        # ``vlm``: an already opened one (a device bundle's engine runtime, medlite/engines/bundle_host.py)
        self.vlm = vlm if vlm is not None else OnnxVlm.open(folder, providers=["CPUExecutionProvider"], ctx=ctx)
        self.own_runtime = vlm is None     # medlite's ONNX Runtime path (it has the follow-up prefix cache)
        self.max_new_tokens, self.ignore_eos = int(max_new_tokens), bool(ignore_eos)
        self.stops_early = bool(stop_at_eos) and not self.ignore_eos
        self.threads = int(threads or physical_cores())
        used = sorted({p for ps in self.vlm.providers.values() for p in ps})
        self.runtime = f"onnxruntime ({', '.join(used)})" if vlm is None else "; ".join(
            f"{k}: {v}" for k, v in getattr(vlm, "backend", {}).items())
        # what runs (int8 Q/DQ, w4a16 ...), from the quantization records: not the trace precision
        self.precision = precision_summary(self.vlm.config)

    def prompt_tokens(self, question: str) -> int:
        return len(self.vlm.prompt_ids(question))

    def check(self, question: str) -> None:
        """Refuse a prompt + max_new_tokens past the decoder's positions or the engines' bounds (one line)."""
        self.vlm.check_request([question], self.max_new_tokens)

    def _stopped(self, ids: list) -> bool:
        return any(s in self.vlm._text(ids) for s in self.vlm.config.template.stop if s)

    def answer_ids(self, ids: list) -> list:
        """The answer within ``ids`` (all of them with ``ignore_eos``)."""
        return list(ids) if self.ignore_eos else answer_prefix(ids, set(self.vlm.config.eos_token_ids),
                                                                self._stopped)

    def encode(self, image):
        return self.vlm.image_embeddings(image)

    def generate(self, image, question: str) -> RunTimes:
        from medlite.runtime.decoding import greedy_generate

        vlm, c = self.vlm, self.vlm.config
        clock = StepClock()
        first = vlm._first([image], [question])
        (ids,) = greedy_generate(
            clock.wrap_decoder(vlm._decoder), vlm._embed, first, max_new_tokens=self.max_new_tokens,
            stop_ids=set(c.eos_token_ids) if self.stops_early else set(), suppress_ids=list(c.suppress_token_ids),
            is_stopped=(lambda _r, g: self._stopped(g)) if self.stops_early else (lambda _r, _g: False),
            on_step=clock.token)
        return clock.result(ids)

    def answer_text(self, ids: list) -> str:
        from medlite.prompting import clean_answer

        return clean_answer(self.vlm._text(ids), tuple(s for s in self.vlm.config.template.stop if s))

    def followup(self, image, first_question: str, question: str, runs: int, warmup: int, progress=None):
        """``(median TTFT ms, prefill tokens)`` of ``question`` asked after ``first_question`` on ``image``,
        with the image's prompt-prefix KV cache kept; None where it is not kept (a device bundle's engines,
        a template with the image after the question)."""
        import statistics

        from medlite.runtime.decoding import greedy_generate
        from medlite.runtime.prefix_cache import PrefixCache

        if not self.own_runtime:
            return None
        vlm, cache = self.vlm, PrefixCache()
        cache.generate(vlm, image, first_question, max_new_tokens=1)      # the first question keeps the prefix
        times, info = [], {}
        for i in range(warmup + runs):
            clock = StepClock()
            first, run, info = cache.first_inputs(vlm, image, question, max_new_tokens=self.max_new_tokens)
            greedy_generate(clock.wrap_decoder(run), vlm._embed, first, max_new_tokens=1, stop_ids=set(),
                            suppress_ids=list(vlm.config.suppress_token_ids), is_stopped=lambda _r, _g: False,
                            on_step=clock.token)
            if i >= warmup:
                times.append(clock.stamps[0] - clock.t0)
            if progress:
                progress(1)
        if info.get("cache") != "hit":
            return None
        return statistics.median(times) * 1e3, int(info["prefill_tokens"])


class TorchBackend:
    """A checkpoint in PyTorch eager (the model's own dtype, usually fp32 on CPU)."""

    kind = "checkpoint"
    runtime = "pytorch eager"

    def __init__(self, loaded, *, max_new_tokens: int, ignore_eos: bool, stop_at_eos: bool = False):
        import torch

        self.loaded = loaded
        self.max_new_tokens, self.ignore_eos = int(max_new_tokens), bool(ignore_eos)
        self.stops_early = bool(stop_at_eos) and not self.ignore_eos
        self.threads = int(torch.get_num_threads())
        self.precision = str(next(loaded.model.parameters()).dtype).replace("torch.", "")

    def prompt_tokens(self, question: str) -> int:
        from medlite.checkpoints.generate import prompt_ids

        return len(prompt_ids(self.loaded, question))

    def check(self, question: str) -> None:
        """Refuse a prompt + max_new_tokens past the model's ``max_position_embeddings`` (one line)."""
        from medlite.checkpoints.generate import check_context

        check_context(self.loaded, [self.prompt_tokens(question)], self.max_new_tokens)

    def _stopped(self, ids: list) -> bool:
        from medlite.checkpoints.generate import _stop_hit

        return _stop_hit(self.loaded, self.loaded.tokenizer.decode(ids, skip_special_tokens=True))

    def answer_ids(self, ids: list) -> list:
        """The answer within ``ids`` (all of them with ``ignore_eos``)."""
        return list(ids) if self.ignore_eos else answer_prefix(ids, set(self.loaded.eos_token_ids), self._stopped)

    def encode(self, image):
        from medlite.checkpoints.generate import image_embeddings

        return image_embeddings(self.loaded, image)

    def generate(self, image, question: str) -> RunTimes:
        import torch

        from medlite.checkpoints.generate import _forward, _pick, pixel_values, prompt_ids

        lm = self.loaded
        clock = StepClock()
        lang = lm.model.model.language_model
        started: list = []
        pre = lang.register_forward_pre_hook(lambda *_: started.append(__import__("time").perf_counter()))
        post = lang.register_forward_hook(lambda *_: None if clock.prefill is not None else
                                          setattr(clock, "prefill", __import__("time").perf_counter() - started[0]))
        try:
            out = _forward(lm, torch.tensor([prompt_ids(lm, question)]), pixel_values(lm, image))
            eos, gen = (set(lm.eos_token_ids) if self.stops_early else set()), []
            for _ in range(self.max_new_tokens):
                nxt = int(_pick(out.logits[0, -1], lm.image_token_id))
                clock.token()
                if nxt in eos:
                    break
                gen.append(nxt)
                if self.stops_early and self._stopped(gen):
                    break
                if len(gen) == self.max_new_tokens:
                    break
                out = _forward(lm, torch.tensor([[nxt]]), None, past=out.past_key_values)
        finally:
            pre.remove()
            post.remove()
        return clock.result(gen)

    def answer_text(self, ids: list) -> str:
        from medlite.prompting import clean_answer

        return clean_answer(self.loaded.tokenizer.decode(ids, skip_special_tokens=True), self.loaded.template.stop)


__all__ = ["OrtBackend", "TorchBackend"]
