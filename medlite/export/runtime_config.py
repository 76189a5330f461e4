"""Generate ``medlite_runtime.json`` from the loaded model and the written graphs."""
from __future__ import annotations

from typing import Optional

import onnx

from medlite.export.files import EMBED_TABLE_FILE
from medlite.export.modules import MASK_VALUE
from medlite.runtime.config import GraphSpec, RuntimeConfig, TensorSpec


def _np_dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def graph_spec_from_onnx(model: onnx.ModelProto, file: str, data_files: list[str]) -> GraphSpec:
    """Input/output names, numpy dtypes and (symbolic) shapes of a graph, as the runtime config records them."""
    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        return TensorSpec(vi.name, _np_dtype_name(tt.elem_type), shape)

    inits = {i.name for i in model.graph.initializer}
    return GraphSpec(file=file, data_files=sorted(data_files),
                     inputs=[spec(v) for v in model.graph.input if v.name not in inits],
                     outputs=[spec(v) for v in model.graph.output])


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from medlite import __version__

    return {"medlite": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "exporter": "torch.onnx TorchScript (dynamo=False)"}


def _max_positions(loaded) -> dict:
    """``max_position_embeddings`` of the language model (the runtime refuses longer requests) and the
    sizes the device-memory model's activation term needs (:mod:`medlite.engines.memory`)."""
    tc, vc = loaded.model.config.text_config, loaded.model.config.vision_config
    n = getattr(tc, "max_position_embeddings", None)
    out = {"max_position_embeddings": int(n)} if n else {}
    out.update(num_attention_heads=int(tc.num_attention_heads), intermediate_size=int(tc.intermediate_size),
               vision_hidden_size=int(vc.hidden_size), vision_intermediate_size=int(vc.intermediate_size),
               vision_num_attention_heads=int(vc.num_attention_heads),
               vision_tokens=int((vc.image_size // vc.patch_size) ** 2))
    return out


def runtime_config_from_loaded(loaded, *, precision: str, opset: int, graphs: dict[str, GraphSpec],
                               dims: dict[str, int], table: Optional[dict], fp32_ops: dict,
                               trt_check: dict, kv_precision: Optional[str] = None) -> RuntimeConfig:
    """The runtime config for an export of ``loaded`` (a :class:`~medlite.checkpoints.model.LoadedModel`).

    ``table`` describes ``embed_tokens.bin`` (dtype, shape, tied) or is None when no graph needed it.
    """
    kv_dtype = "float16" if (kv_precision or precision) == "fp16" else "float32"
    return RuntimeConfig(
        graphs=graphs, precision=precision, opset=opset, model={**dims, **_max_positions(loaded)},
        image_token_id=int(loaded.image_token_id), num_image_tokens=int(loaded.num_image_tokens),
        eos_token_ids=[int(t) for t in loaded.eos_token_ids],
        bos_token_id=None if loaded.bos_token_id is None else int(loaded.bos_token_id),
        pad_token_id=int(loaded.pad_token_id),
        # The image token has a zero lm_head row; generation must never produce it.
        suppress_token_ids=[int(loaded.image_token_id)],
        image_spec=loaded.image_spec, template=loaded.template, tokenizer_file="tokenizer.json",
        embedding_table=({"file": EMBED_TABLE_FILE, "offset": 0, **table} if table else
                         {"file": None, "dtype": None, "shape": None}),
        kv_cache={
            "past_name": "past_key_values.{layer}.{kind}", "present_name": "present.{layer}.{kind}",
            "kinds": ["key", "value"], "dtype": kv_dtype,
            "layout": "[batch, num_kv_heads, slots, head_dim]",
            "convention": "dummy_slot", "prefill_past_slots": 1, "dummy_slot_value": 0.0,
            "dummy_slot_mask": 0,
            "note": "past length is always >= 1: prefill passes one zero slot with attention_mask 0; "
                    "attention_mask covers past+seq slots; position_ids count real tokens only",
        },
        mask_value=MASK_VALUE, model_name=loaded.name, source=loaded.source.to_dict(),
        generator=_versions(), fp32_ops=fp32_ops, trt_check=trt_check)
