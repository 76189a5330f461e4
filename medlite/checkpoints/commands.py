"""CLI handlers for ``inspect``, ``convert``, ``ask`` (PyTorch) and ``demo random``: ``cmd_x(args, ctx) -> int``."""
from __future__ import annotations

import json
from pathlib import Path

from medlite.errors import CheckpointError
from medlite.fileio import staged_folder
from medlite.units import common_unit, human_bytes


def _opt(args, name, default=None):
    return getattr(args, name, default)


def _resolve_path(path, ctx) -> Path:
    from medlite.model_choice import ModelChoice

    return ModelChoice(path=path).folder(ctx)


# -- inspect ---------------------------------------------------------------------------------------
def inspect_report(path, *, ctx, base=None, vision_tower=None, vision_weights=None, template=None) -> dict:
    """The facts ``medlite inspect`` shows, as a JSON-able dict (read from headers without torch; see
    :mod:`medlite.checkpoints.headers` for the cases that still read them on the meta device).

    For a LoRA adapter folder the report describes the merged model (base architecture) plus ``adapter``.
    """
    from medlite.checkpoints.headers import inspect_facts

    f = inspect_facts(path, ctx=ctx, base=base, vision_tower=vision_tower, vision_weights=vision_weights,
                      template=template)
    return report_from_facts(path, f)


def report_from_facts(path, f) -> dict:
    """``medlite inspect``'s dict from :class:`medlite.checkpoints.headers.CheckpointFacts`."""
    t, v = f.text, f.vision
    heads = f"{t['num_attention_heads']} heads"
    if t["num_key_value_heads"] != t["num_attention_heads"]:
        heads += f" / {t['num_key_value_heads']} KV heads"
    return {
        "path": str(Path(path)), "format": f.source.format, "text_backbone": f.source.text_backbone,
        "source_dtype": f.source.dtype,
        "architecture": {
            "llm": f"{t['model_type']}: {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, "
                   f"intermediate {t['intermediate_size']}, {heads}, vocab {t['vocab_size']} (incl. <image>)",
            "vision": f"SigLIP: {v['num_hidden_layers']} layers used, hidden {v['hidden_size']}, intermediate "
                      f"{v['intermediate_size']}, {v['num_attention_heads']} heads, patch {v['patch_size']}, "
                      f"image {v['image_size']}",
            "projector": f"mlp2x_gelu {v['hidden_size']}→{t['hidden_size']}→{t['hidden_size']}",
            "feature_select": f.feature_select,
        },
        "params": f.breakdown,
        "image_token_id": f.image_token_id, "num_image_tokens": f.num_image_tokens,
        "template": f.template, "image_spec": f.image_spec.to_dict(),
        "eos_token_ids": f.eos_token_ids, "bos_token_id": f.bos_token_id, "pad_token_id": f.pad_token_id,
        "vision_weights": f.source.vision_weights, "vision_tower": f.source.vision_tower,
        "adapter": f.source.adapter, "notes": f.source.notes,
    }


def _fmt_n(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e5 else str(n)


def cmd_inspect(args, ctx) -> int:
    """Format, backbone, architecture, parameters and bytes per component, notes."""
    path = _resolve_path(_opt(args, "model"), ctx)
    rep = inspect_report(path, ctx=ctx, base=_opt(args, "base"), vision_tower=_opt(args, "vision_tower"),
                         vision_weights=_opt(args, "vision_weights"), template=_opt(args, "template"))
    if ctx.json_mode:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    from rich.table import Table

    from medlite.context import make_console

    out = make_console(stderr=False)
    out.print(f"[bold]{rep['path']}[/]  format [cyan]{rep['format']}[/] · backbone [cyan]{rep['text_backbone']}[/] "
              f"· source dtype {rep['source_dtype']}")
    for k, v in rep["architecture"].items():
        out.print(f"  {k:<15}{v}")
    names = ("vision_tower", "projector", "llm", "embeddings", "total")
    unit = common_unit(rep["params"][n]["bytes"] for n in names)   # one unit: the column compares
    table = Table(title="parameters")
    table.add_column("component")
    table.add_column("params", justify="right")
    table.add_column(f"bytes ({rep['source_dtype']})", justify="right")
    for name in names:
        p = rep["params"][name]
        table.add_row(name, _fmt_n(p["params"]), human_bytes(p["bytes"], unit))
    out.print(table)
    out.print(f"  image tokens   {rep['num_image_tokens']} (token id {rep['image_token_id']})")
    out.print(f"  template       {rep['template']}   eos {rep['eos_token_ids']}  bos {rep['bos_token_id']}")
    s = rep["image_spec"]
    out.print(f"  preprocessing  {s['size']} px, pad to square {s['pad_to_square']}, mean {s['mean']}, std {s['std']}")
    if rep["adapter"]:
        from medlite.checkpoints.lora import describe_adapter

        for line in describe_adapter(rep["adapter"]):
            out.print(f"  {line}")
    for n in rep["notes"]:
        out.print(f"  [dim]• {n}[/]")
    return 0


# -- convert ---------------------------------------------------------------------------------------
def write_canonical(loaded, out_dir, *, ctx) -> Path:
    """Write ``loaded`` as a plain HF Llava folder (+ tokenizer.json, medlite_source.json), atomically."""
    from medlite.checkpoints.writers import preprocessor_dict, write_tokenizer_files

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; remove it or choose another --out")
    with staged_folder(out) as tmp:
        loaded.model.save_pretrained(tmp)
        write_tokenizer_files(tmp, loaded.tokenizer, bos=loaded.bos_token_id, eos=loaded.eos_token_ids,
                              pad=loaded.pad_token_id, add_bos=loaded.bos_token_id is not None)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(loaded.image_spec), indent=2))
        meta = {"written_by": "medlite convert", "source": loaded.source.to_dict(), "template": loaded.template.name,
                "template_def": loaded.template.to_dict(), "image_spec": loaded.image_spec.to_dict(),
                "image_token_id": loaded.image_token_id, "num_image_tokens": loaded.num_image_tokens,
                "eos_token_ids": loaded.eos_token_ids, "bos_token_id": loaded.bos_token_id,
                "pad_token_id": loaded.pad_token_id}
        (tmp / "medlite_source.json").write_text(json.dumps(meta, indent=2, default=str))
    if loaded.model.lm_head.bias is not None:
        ctx.warn(f"{out}: lm_head has a bias ({loaded.source.text_backbone}); medlite keeps it, but plain "
                 f"transformers LlavaForConditionalGeneration has no lm_head bias and drops it (changed logits)")
    return out


_PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def cmd_convert(args, ctx) -> int:
    """``convert --model PATH --out DIR [--precision fp32|fp16|bf16]``: the canonical folder plain
    transformers loads."""
    from medlite.fileio import ensure_writable_dir
    from medlite.model_choice import load_from_args

    ensure_writable_dir(args.out, "--out")
    loaded = load_from_args(args, ctx, dtype=_PRECISION_DTYPES.get(_opt(args, "precision") or "fp32"))
    with ctx.stage("convert") as info:
        out = write_canonical(loaded, args.out, ctx=ctx)
        info["detail"] = f"{out} (HF Llava, {next(loaded.model.parameters()).dtype})".replace("torch.", "")
    return 0


# -- ask -------------------------------------------------------------------------------------------
def _checkpoint_facts(choice, loaded, folder: Path) -> dict:
    """What answers, for ``ask``'s model line / ``--json``: the checkpoint folder or the built-in demo model."""
    label = str(folder) if choice.path else f"built-in demo model ({folder})"
    dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    prec = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
    return {"folder": label, "name": loaded.name, "version": None, "status": None,
            "hash_check": "skipped (a checkpoint: no manifest.json)",
            "runtime": f"PyTorch ({_device_name(loaded)})",
            "format": loaded.source.format, "precision": {"model": prec}}


def _device_name(loaded) -> str:
    from medlite.devices import describe, describe_line, is_cpu, model_device

    dev = model_device(loaded.model)
    return "CPU" if is_cpu(dev) else describe_line(describe(dev))


def cmd_ask(args, ctx) -> int:
    """Greedy answers from the PyTorch reference model, streamed to stdout (one per question), with the
    checkpoint that answers named on stderr (or in ``--json``)."""
    from medlite.checkpoints.generate import answer
    from medlite.model_choice import ModelChoice
    from medlite.runtime.commands import load_ask_image, print_answers

    from medlite.devices import is_cpu, resolve_device

    device = resolve_device(_opt(args, "device"))      # a device this machine lacks: one line, before any load
    image, facts = load_ask_image(args.image, _opt(args, "frame"), ctx)
    choice = ModelChoice.from_args(args)
    folder = choice.folder(ctx)
    loaded = choice.load(ctx)
    if not is_cpu(device):
        loaded.model.to(device)
    n = int(_opt(args, "max_new_tokens", 32))
    questions = _opt(args, "questions") or [args.question]
    print_answers(questions, lambda q, on_text: answer(loaded, image, q, max_new_tokens=n, on_text=on_text), ctx,
                  model=_checkpoint_facts(choice, loaded, folder), image=facts)
    return 0


# -- demo random -----------------------------------------------------------------------------------
def cmd_demo_random(args, ctx) -> int:
    """``demo random --preset P --format F --out DIR``: a random-weight checkpoint (streamed fp16 shards)."""
    from medlite.checkpoints.random_ckpt import get_preset, write_random_checkpoint

    from medlite.fileio import ensure_writable_dir

    preset = get_preset(args.preset)
    out = ensure_writable_dir(args.out, "--out")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; remove it or choose another --out")
    seed = int(_opt(args, "seed", 0) or 0)
    with ctx.stage("random") as info:
        with staged_folder(out) as tmp:
            write_random_checkpoint(preset.name, tmp, fmt=args.format, seed=seed, ctx=ctx)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        info["detail"] = f"{preset.name} ({args.format}, seed {seed}) → {out}  {human_bytes(size)}"
    if preset.notes:
        ctx.info(f"  {preset.notes}")
    if ctx.json_mode:      # one object on stdout (scripts read it: benchmarks/*_full_size.py)
        print(json.dumps({"preset": preset.name, "format": args.format, "seed": seed, "path": str(out),
                          "bytes": size}))
    return 0
