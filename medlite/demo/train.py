"""Training of the built-in demo model: a micro TinyLLaVA-Med on the Micro Med-VQA train split.

The model is the canonical ``LlavaForConditionalGeneration`` with the *legacy* TinyLLaVA-Med
semantics (docs/architecture.md): a SigLIP-style tower whose last layer output is used as it is
(``vision_feature_layer=-1``, strategy ``"full"``, no pooling head), an ``mlp2x_gelu`` projector and
a Llama decoder with grouped-query attention. ``<image>`` is the last vocabulary id, so writing
the legacy format is dropping that row.

Training is plain next-token cross-entropy on the answer tokens only (``Yes``/``No`` + ``</s>``),
prompts rendered with the vicuna_v1 template exactly as inference renders them. Everything is
seeded and runs on 2 CPU threads, so a rebuild gives the same model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from medlite.demo.tokenizer import BOS, EOS, PAD, train_demo_tokenizer
from medlite.demo.micro_vqa import IMAGE_SIZE, question_templates
from medlite.preprocess import ImageSpec
from medlite.prompting import TEMPLATES, encode_prompt, expand_image_tokens

TEMPLATE = "vicuna_v1"
IMAGE_SPEC = ImageSpec(size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_to_square=True,
                       resample="bicubic", rescale=1 / 255)


def image_spec_for(recipe: "DemoRecipe") -> ImageSpec:
    """SigLIP preprocessing (mean/std 0.5, bicubic) with LLaVA's pad-to-square, at the recipe's size."""
    return dataclasses.replace(IMAGE_SPEC, size=recipe.image_size)


@dataclass(frozen=True)
class DemoRecipe:
    """Architecture and training hyper-parameters (all of it goes into the cache key)."""

    # vision tower (SigLIP-style): 56 px / patch 8 -> 7 x 7 = 49 image tokens
    image_size: int = IMAGE_SIZE
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 384
    # Llama decoder
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 352
    vocab_size: int = 640
    # optimisation
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.01
    vision_steps: int = 1300      # stage 1: vision tower warm-up with linear probes
    vision_batch: int = 32
    vision_lr: float = 2e-3
    tower_lr_scale: float = 0.0   # stage 2 keeps the warmed-up tower frozen (it generalises; tuned, it memorises sources)
    captions: bool = True         # mix image descriptions into stage 2 (see caption_for)
    direct_steps: int = 600       # stage-2 curriculum: two-form questions asked only in the positive form at first
    choice_frac: float = 0.0      # share of side/brightness examples asked as "left or right?" (answer a word)
    hard_repeat: int = 3          # side/brightness examples appear this many times per stage-2 epoch
    ema: float = 0.995            # stage 2 keeps an exponential moving average of the weights (0: off)
    threads: int = 2
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tokenizer_corpus() -> list[str]:
    """What the tokenizer is trained on: rendered prompts of every question + the answers."""
    tmpl = TEMPLATES[TEMPLATE]
    qs = question_templates()
    from medlite.demo.micro_vqa import MODALITY_NAMES, REGION_PHRASES

    captions = [f"{m.capitalize()} of {r}, colour, greyscale, no lesion, with a bright dark lesion on the left "
                f"right side." for m in MODALITY_NAMES.values() for r in REGION_PHRASES.values()]
    choice = [SIDE_CHOICE, BRIGHT_CHOICE]
    return ([tmpl.render(q, with_image=False) for q in qs + [CAPTION_QUESTION] + choice]
            + [f"{q} {a}" for q in qs for a in ("Yes", "No")] + captions
            + [f"{SIDE_CHOICE} Left Right", f"{BRIGHT_CHOICE} Bright Dark"])


CAPTION_QUESTION = "Describe the image."


def caption_for(sample, lesion="view") -> str:
    """A one-sentence description of a Micro Med-VQA view (the stage-2 caption target).

    LLaVA aligns image features with words on image–caption pairs before instruction tuning; the
    demo does the same on these captions, mixed into the question–answer batches. Every word of a
    caption is predictable from the image alone, so the decoder learns to read the image long
    before it can solve the balanced yes/no questions (where only question *and* image together
    predict the answer). ``lesion`` is the lesion actually drawn (a ``Lesion`` or None); the
    default describes the view's own.
    """
    from medlite.demo.lesions import Lesion
    from medlite.demo.micro_vqa import MODALITY_NAMES, REGION_PHRASES

    m = dict(sample.meta)
    if lesion == "view":
        lesion = None if m.get("lesion_side") is None else Lesion(m["lesion_side"], bool(m.get("lesion_bright")))
    text = MODALITY_NAMES.get(sample.modality, "medical image").capitalize()
    if sample.region in REGION_PHRASES:
        text += f" of {REGION_PHRASES[sample.region]}"
    text += ", colour" if m.get("is_color") else ", greyscale"
    if lesion is None:
        return text + ", no lesion."
    return text + f", with a {'bright' if lesion.bright else 'dark'} lesion on the {lesion.side} side."


SIDE_CHOICE = "Is the lesion on the left or the right side?"
BRIGHT_CHOICE = "Is the lesion bright or dark?"


def _fresh_example(sample, kind: str, bank, row: int, rng, textures, form: str = "asked") -> tuple:
    """``(uint8 image, question, answer text)`` for a lesion / colour question or a caption asked
    about a freshly drawn lesion (and, except for captions, maybe another background: see
    :func:`medlite.demo.vision.random_background`).

    ``form`` concerns the questions asked in two opposite forms (colour / greyscale, left / right,
    bright / dark): ``"asked"`` keeps the sample's question, ``"direct"`` asks the positive form
    ("colour?", "left?", "bright?": the answer is the image feature itself, no interaction with
    the question word to learn yet), ``"choice"`` (side / brightness only) asks "left or right?"
    with the word as the answer.
    """
    from medlite.demo.vision import fresh_lesion, random_background
    from medlite.demo.micro_vqa import _BRIGHT_Q, _COLOUR_Q, _SIDE_Q

    question = sample.question
    if kind == "caption":
        arr, is_color = bank.clean[row].astype(np.float32), bool(bank.is_color[row])
    else:
        arr, is_color = random_background(bank, row, rng, textures)
    present = kind in ("lesion_side", "lesion_brightness") or bool(rng.random() < 0.5)
    img, lesion = fresh_lesion(arr, is_color, rng, present=present)
    if kind == "caption":
        return img, question, caption_for(sample, lesion)
    if kind == "colour" and form == "direct":
        question = _COLOUR_Q["colour"][int(rng.integers(len(_COLOUR_Q["colour"])))]
    elif kind in ("lesion_side", "lesion_brightness") and form != "asked":
        table, choice = (_SIDE_Q["left"], SIDE_CHOICE) if kind == "lesion_side" else (_BRIGHT_Q["bright"], BRIGHT_CHOICE)
        if form == "choice":
            word = lesion.side if kind == "lesion_side" else ("bright" if lesion.bright else "dark")
            return img, choice, word.capitalize()
        question = table[int(rng.integers(len(table)))]
    q = question.lower()
    if kind == "colour":
        return img, question, "Yes" if (("colour" in q) == is_color) else "No"
    if kind == "lesion":
        return img, question, "Yes" if lesion is not None else "No"
    if kind == "lesion_side":
        return img, question, "Yes" if (("left" in q) == (lesion.side == "left")) else "No"
    return img, question, "Yes" if (("bright" in q) == lesion.bright) else "No"


def build_config(recipe: DemoRecipe, text_vocab: int):
    """The ``LlavaConfig``; ``text_vocab`` is the tokenizer size, ``<image>`` gets id ``text_vocab``."""
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(image_size=recipe.image_size, patch_size=recipe.patch_size,
                                hidden_size=recipe.vision_hidden, num_hidden_layers=recipe.vision_layers,
                                num_attention_heads=recipe.vision_heads, intermediate_size=recipe.vision_intermediate,
                                vision_use_head=False)
    text = LlamaConfig(vocab_size=text_vocab + 1, hidden_size=recipe.text_hidden,
                       intermediate_size=recipe.text_intermediate, num_hidden_layers=recipe.text_layers,
                       num_attention_heads=recipe.text_heads, num_key_value_heads=recipe.text_kv_heads,
                       max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=text_vocab,
                       projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                       image_seq_length=recipe.num_image_tokens)


def encode_sample(tok, question: str, answer: Optional[str], image_token_id: int, n_image: int) -> tuple[list, list]:
    """``(input_ids, labels)``: the rendered prompt (image expanded) + answer + ``</s>``, loss on the answer."""
    prompt = encode_prompt(tok, TEMPLATES[TEMPLATE].render(question), image_token_id=image_token_id, bos_token_id=BOS)
    prompt = expand_image_tokens(prompt, image_token_id, n_image)
    if answer is None:
        return prompt, [-100] * len(prompt)
    ans = tok.encode(answer, add_special_tokens=False).ids + [EOS]
    return prompt + ans, [-100] * len(prompt) + ans


def _normalise(u8, spec: ImageSpec):
    """uint8 NHWC (already ``size`` square) → normalised NCHW float32, as ``preprocess`` does."""
    import torch

    x = u8.permute(0, 3, 1, 2).to(torch.float64) * spec.rescale
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32) - mean) / std


def _per_sample_loss(logits, labels):
    """Mean over samples of each sample's mean token loss (a 15-token caption counts as much as a
    2-token yes/no answer, not 7 times more)."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100, reduction="none").view(labels.shape)
    n = (labels != -100).sum(dim=1).clamp(min=1)
    return (tok.sum(dim=1) / n).mean()


def train_demo(samples, recipe: DemoRecipe, *, ctx, on_step=None):
    """Train from scratch; returns ``(model, tokenizer_with_image, history)``.

    ``samples`` are Micro Med-VQA train samples rendered at ``recipe.image_size``. The returned
    tokenizer has ``<image>`` appended at ``model.config.image_token_id``. ``history`` holds the
    loss curve (every 25 steps) and timings.
    """
    import time

    import torch
    from tokenizers import AddedToken
    from transformers import LlavaForConditionalGeneration

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        tok = train_demo_tokenizer(tokenizer_corpus(), vocab_size=recipe.vocab_size)
        text_vocab = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
        image_id = tok.token_to_id("<image>")
        assert image_id == text_vocab, (image_id, text_vocab)
        n_img = recipe.num_image_tokens
        from medlite.demo.vision import render_views, warm_up_vision

        bank = render_views(samples, ctx)
        if bank.shown.shape[1] != recipe.image_size:
            raise ValueError(f"samples are rendered at {bank.shown.shape[1]} px, the recipe wants {recipe.image_size}")
        img_index = list(bank.index)
        encoded = [encode_sample(tok, s.question, s.answer, image_id, n_img) for s in samples]
        # lesion questions (and captions) are asked about a lesion drawn afresh at every step
        fresh: list = [(s, dict(s.meta).get("question_type")) for s in samples]
        fresh = [(s, k) if k in ("colour", "lesion", "lesion_side", "lesion_brightness") else None for s, k in fresh]
        if recipe.captions:
            first_of_view: dict[int, object] = {}
            for s, r in zip(samples, bank.index):
                first_of_view.setdefault(r, s)
            for r, s in sorted(first_of_view.items()):
                encoded.append(encode_sample(tok, CAPTION_QUESTION, caption_for(s), image_id, n_img))
                img_index.append(r)
                fresh.append((s, "caption"))
        prompts = [x[: len(x) - sum(1 for v in y if v != -100)] for x, y in encoded]
        lesion_rng = np.random.default_rng(recipe.seed + 3)
        from medlite.demo.vision import texture_backgrounds

        textures = texture_backgrounds(recipe.image_size, seed=recipe.seed + 4)
        pixels_u8 = torch.from_numpy(bank.shown)
        t_data = time.perf_counter() - t0

        torch.manual_seed(recipe.seed)
        config = build_config(recipe, text_vocab)
        model = LlavaForConditionalGeneration(config)
        model.train()
        vision_losses = []
        if recipe.vision_steps:
            vision_losses = warm_up_vision(model, bank, recipe, ctx, lambda u8: _normalise(u8, IMAGE_SPEC))
            if on_step is not None:
                on_step(0, sum(vision_losses[-10:]) / len(vision_losses[-10:]))
        tower_ids = {id(p) for p in model.model.vision_tower.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in tower_ids], "scale": 1.0}]
        if recipe.tower_lr_scale:
            groups.append({"params": [p for p in model.parameters() if id(p) in tower_ids], "scale": recipe.tower_lr_scale})
        else:  # frozen: no gradients through the tower at all (a third of the step time)
            model.model.vision_tower.requires_grad_(False)
        opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return recipe.lr * (step + 1) / recipe.warmup
            frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

        trained = [p for g in groups for p in g["params"]]
        ema = [p.detach().clone() for p in trained] if recipe.ema else None
        gen = torch.Generator().manual_seed(recipe.seed)
        hard = [i for i, f in enumerate(fresh) if f is not None and f[1] in ("lesion_side", "lesion_brightness")]
        pool = list(range(len(encoded))) + hard * (recipe.hard_repeat - 1)
        order: list[int] = []
        losses: list[tuple[int, float]] = []
        running, since = 0.0, 0
        with ctx.progress("train demo model", total=recipe.steps) as advance:
            for step in range(recipe.steps):
                if len(order) < recipe.batch_size:
                    order += [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
                batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
                rows, images = [], []
                for i in batch:
                    if fresh[i] is None:
                        rows.append(encoded[i])
                        images.append(pixels_u8[img_index[i]])
                        continue
                    form = "direct" if step < recipe.direct_steps else "asked"
                    if recipe.choice_frac and lesion_rng.random() < recipe.choice_frac:
                        form = "choice"
                    img, question, answer = _fresh_example(fresh[i][0], fresh[i][1], bank, img_index[i], lesion_rng,
                                                           textures, form)
                    prompt = prompts[i]
                    if question != fresh[i][0].question and fresh[i][1] != "caption":
                        prompt = encode_sample(tok, question, None, image_id, n_img)[0]
                    ans = tok.encode(answer, add_special_tokens=False).ids + [EOS]
                    rows.append((prompt + ans, [-100] * len(prompt) + ans))
                    images.append(torch.from_numpy(img))
                width = max(len(x) for x, _ in rows)
                ids = torch.full((len(batch), width), PAD, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (x, y) in enumerate(rows):
                    ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
                pix = _normalise(torch.stack(images), IMAGE_SPEC)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step) * g["scale"]
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
                loss = _per_sample_loss(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, trained, 1.0 - recipe.ema)
                running += float(loss.detach())
                since += 1
                if (step + 1) % 25 == 0 or step + 1 == recipe.steps:
                    losses.append((step + 1, running / since))
                    running, since = 0.0, 0
                    if on_step is not None:
                        on_step(step + 1, losses[-1][1])
                advance()
        model.eval()
        if ema is not None:  # the averaged weights are the model (less step-to-step noise, generalises better)
            with torch.no_grad():
                for p, e in zip(trained, ema):
                    p.copy_(e)
        with torch.no_grad():  # the <image> row of lm_head is never a prediction (architecture.md)
            model.lm_head.weight[image_id].zero_()
        history = {"loss": losses, "vision_loss": vision_losses[::10], "data_s": round(t_data, 2), "train_s": round(time.perf_counter() - t0 - t_data, 2),
                   "examples": len(encoded), "views": int(pixels_u8.shape[0]),
                   "params": int(sum(p.numel() for p in model.parameters()))}
        return model, tok, history
    finally:
        torch.set_num_threads(old_threads)
