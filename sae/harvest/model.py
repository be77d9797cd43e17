"""Load a causal LM and run it only up to the harvested block.

Hook site (the convention SAELens and TransformerLens use): ``--layer L`` is the residual stream
*after* block L (0-based), i.e. the output of the (L+1)-th decoder block, which is
``output_hidden_states[L + 1]`` in Hugging Face terms and ``blocks.L.hook_resid_post`` in
TransformerLens terms. It is taken before any final norm. (For the model's last block, Hugging Face's
``hidden_states[-1]`` has the final norm applied; the harvest still stores the block's raw output,
as TransformerLens does.)

Blocks after L are removed from the model (their weights are freed) and a forward hook on block
L stops the forward pass by raising, so neither later blocks, the final norm nor the LM head run
and no other hidden state is kept. This works for any architecture whose decoder blocks live in
one ``nn.ModuleList`` of ``num_hidden_layers`` modules (Gemma, Llama, Mistral, Qwen, GPT-2, ...),
with no per-model code. A GGUF file is just another ``--model`` source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae.errors import SaeError

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def hook_name(layer: int) -> str:
    """The TransformerLens/SAELens name of the harvested site."""
    return f"blocks.{layer}.hook_resid_post"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise SaeError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pretrained_args(model: str) -> tuple[str, dict[str, Any]]:
    """``path/to/file.gguf`` loads as ``from_pretrained(folder, gguf_file=name)``."""
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise SaeError(f"--model {model}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load_error(model: str, err: Exception) -> SaeError:
    text = str(err).strip().splitlines()
    first = text[0].rstrip(".") if text else type(err).__name__
    if isinstance(err, ImportError) or ("gguf" in first.lower() and "install" in first.lower()):
        return SaeError(
            f"cannot load {model!r}: {first} (GGUF models need `pip install gguf accelerate`)"
        )
    return SaeError(
        f"cannot load model {model!r}: {first}. Give a local folder or .gguf file, or a hub id "
        "with network access (set HF_TOKEN for gated models such as Gemma)."
    )


def load_tokenizer(model: str, revision: str | None = None):
    from transformers import AutoTokenizer

    name, extra = _pretrained_args(model)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, **extra)
    except Exception as err:
        raise _load_error(model, err) from None


def _text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_blocks(model: torch.nn.Module, n_layers: int) -> tuple[torch.nn.Module, str]:
    """The ModuleList that holds the decoder blocks (and its attribute path), found by shape."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module, name
    raise SaeError(
        f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; "
        "this architecture is not supported"
    )


class _Stop(Exception):
    """Raised by the hook to end the forward pass right after the harvested block."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


@dataclass
class LayerModel:
    """A causal LM cut after block ``layer``; ``__call__(ids)`` returns that block's output."""

    model: torch.nn.Module
    layer: int
    n_layers: int
    d_model: int
    device: torch.device
    dtype: torch.dtype
    max_positions: int | None = None  # the longest input its config allows (None: unknown)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, d_model) residual stream after block ``layer``."""
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _Stop as stop:
            return stop.output
        raise RuntimeError("the harvested block did not run")  # pragma: no cover


def _stop_hook(_module, _inputs, output):
    hidden = output[0] if isinstance(output, tuple | list) else output
    raise _Stop(hidden)


def load_layer_model(
    model: str,
    layer: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
) -> LayerModel:
    """Load ``model`` (hub id, folder or .gguf file) and cut it after block ``layer``."""
    from transformers import AutoConfig

    name, extra = _pretrained_args(model)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, **extra)
    except Exception as err:
        raise _load_error(model, err) from None
    text_config = _text_config(config)
    n_layers = int(text_config.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise SaeError(
            f"--layer {layer} is out of range: {model} has {n_layers} blocks, "
            f"so use 0..{n_layers - 1} (layer L = residual stream after block L)"
        )
    return cut_at_layer(load_causal_lm(model, dtype=dtype, revision=revision), layer, device=device)


def load_causal_lm(model: str, *, dtype: torch.dtype, revision: str | None = None):
    """The whole causal LM (hub id, folder or .gguf file) on the CPU, or a one-line SaeError."""
    from transformers import AutoModelForCausalLM

    name, extra = _pretrained_args(model)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, revision=revision, **{_dtype_kwarg(): dtype}, **extra
        )
    except Exception as err:
        raise _load_error(model, err) from None


def cut_at_layer(lm: torch.nn.Module, layer: int, *, device: torch.device) -> LayerModel:
    """Remove the blocks after ``layer``, stop the forward after it, and move to ``device``."""
    text_config = _text_config(lm.config)
    n_layers = int(text_config.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise SaeError(f"layer {layer} is out of range: the model has {n_layers} blocks")
    blocks, _ = decoder_blocks(lm, n_layers)
    # Drop the blocks we never run, before moving to the GPU: their memory is never needed.
    for index in range(len(blocks) - 1, layer, -1):
        del blocks[index]
    blocks[layer].register_forward_hook(_stop_hook)
    lm.eval().requires_grad_(False)
    lm.to(device)
    dtype = next(lm.parameters()).dtype
    limit = getattr(text_config, "n_positions", None) or getattr(
        text_config, "max_position_embeddings", None
    )
    limit = limit if isinstance(limit, int) and limit > 0 else None
    return LayerModel(lm, layer, n_layers, int(text_config.hidden_size), device, dtype, limit)
