"""Conversation templates and prompt tokenization (torch-free; shared by PyTorch and ONNX paths).

Templates are data: each names the system prompt, the role markers and the stop strings, and is
recorded in runtime configs and manifests. The rendered prompt for one image question is::

    {system}{sep}USER: <image>\\n{question}{sep}ASSISTANT:

which is what LLaVA's ``conv_vicuna_v1`` (TinyLLaVA-Med's training template, ``sep_style=TWO``,
``sep=" "``) and TinyLLaVA Factory's templates (system ending in a space, ``"USER: {q} "``) both
produce. They differ in the end-of-turn string (``</s>`` for Llama, ``<|endoftext|>`` for Phi/Qwen2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMAGE_PLACEHOLDER = "<image>"

_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class ChatTemplate:
    """A single-turn image-question template."""

    name: str
    system: str
    sep: str = " "
    user: str = "USER"
    assistant: str = "ASSISTANT"
    stop: tuple[str, ...] = ("</s>",)
    image_first: bool = True  # "<image>\n{q}" as LLaVA inserts it
    source: str = ""           # where the template comes from

    def render(self, question: str, *, with_image: bool = True) -> str:
        """The generation prompt for one question (ends with ``"ASSISTANT:"``)."""
        q = question.strip()
        if with_image:
            q = f"{IMAGE_PLACEHOLDER}\n{q}" if self.image_first else f"{q}\n{IMAGE_PLACEHOLDER}"
        head = f"{self.system}{self.sep}" if self.system else ""
        return f"{head}{self.user}: {q}{self.sep}{self.assistant}:"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ChatTemplate":
        d = dict(d)
        d["stop"] = tuple(d.get("stop", ()))
        return cls(**d)


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate("vicuna_v1", _VICUNA_SYSTEM, stop=("</s>",),
                              source="LLaVA conv_vicuna_v1 (TinyLLaVA-Med training template)"),
    "phi": ChatTemplate("phi", _VICUNA_SYSTEM, stop=("<|endoftext|>",),
                        source="TinyLLaVA conv_phi / Factory phi template"),
    "qwen2_base": ChatTemplate("qwen2_base", _VICUNA_SYSTEM, stop=("<|endoftext|>",),
                               source="TinyLLaVA Factory qwen2_base template"),
    "llama": ChatTemplate("llama", _VICUNA_SYSTEM, stop=("</s>",), source="TinyLLaVA Factory llama template"),
}


def template_for(name: str) -> ChatTemplate:
    """Look up a template by name; the error lists the known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        from medlite.errors import MedliteError

        raise MedliteError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def encode_prompt(tokenizer, text: str, *, image_token_id: int, bos_token_id: int | None) -> list[int]:
    """Tokenize a rendered prompt the way LLaVA's ``tokenizer_image_token`` does.

    The text is split at each ``<image>``; every chunk is tokenized on its own (so a SentencePiece
    tokenizer adds its word-start marker to each chunk, exactly as in training) and one
    ``image_token_id`` goes between chunks. A single BOS starts the sequence.

    ``tokenizer`` is a ``tokenizers.Tokenizer``.
    """
    ids: list[int] = [bos_token_id] if bos_token_id is not None else []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(image_token_id)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    return ids


def expand_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """Replace each image token by ``n`` copies (one per image embedding)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * n if t == image_token_id else [t])
    return out


def clean_answer(text: str, stop: tuple[str, ...] = ()) -> str:
    """Cut a decoded answer at the first stop string and strip whitespace."""
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


@dataclass
class StopCriteria:
    """Token ids that end generation (eos and the template's end-of-turn tokens)."""

    token_ids: list[int] = field(default_factory=list)
