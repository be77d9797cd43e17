"""The whole language model and its text, for splicing an SAE in (harvest's loaders, uncut).

Text is packed exactly as `sae harvest` packs it ([BOS] + context−1 tokens per window), so the
spliced positions look like the cached ones; pass text that was not harvested for training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.errors import SaeError


@dataclass
class LoadedLM:
    """A full causal LM, its tokenizer and the decoder block the SAE is spliced after."""

    model: torch.nn.Module
    tokenizer: object
    block: torch.nn.Module
    device: torch.device


def model_source(model: str, gguf_file: str | None) -> str:
    """`--model folder --gguf-file x.gguf` is the same as `--model folder/x.gguf`."""
    if gguf_file:
        path = Path(model).expanduser() / gguf_file
        if not path.is_file():
            raise SaeError(f"--gguf-file {gguf_file}: no such file in {model}")
        return str(path)
    return model


def wrap_lm(lm: torch.nn.Module, tokenizer, layer: int, d_model: int, device) -> LoadedLM:
    """Check the SAE fits this model (layer in range, width) and find block `layer`."""
    from sae.harvest.model import decoder_blocks

    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n_layers, width = int(config.num_hidden_layers), int(config.hidden_size)
    if not 0 <= layer < n_layers:
        raise SaeError(
            f"the SAE reads layer {layer} but the model has {n_layers} blocks (0..{n_layers - 1}); "
            "pass the model the SAE was trained on"
        )
    if width != d_model:
        raise SaeError(
            f"the model's hidden size is {width} but the SAE's d_model is {d_model}; "
            "pass the model the SAE was trained on"
        )
    blocks, _ = decoder_blocks(lm, n_layers)
    lm.eval().requires_grad_(False)
    lm.to(device)
    return LoadedLM(lm, tokenizer, blocks[layer], torch.device(device))


def load_lm(model: str, layer: int, d_model: int, *, device: str, dtype: str) -> LoadedLM:
    """Load `model` (hub id, folder or .gguf) whole, with its tokenizer."""
    from sae.harvest.model import load_causal_lm, load_tokenizer, resolve_dtype
    from sae.runtime import resolve_device

    dev = resolve_device(device)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, dtype=resolve_dtype(dtype, dev))
    return wrap_lm(lm, tokenizer, layer, d_model, dev)


def text_windows(
    text: str, tokenizer, context: int, n_tokens: int, batch: int, device, *, column: str = "text"
) -> Iterator[torch.Tensor]:
    """(≤batch, context) token batches packed from `text` until n_tokens tokens were given."""
    from sae.harvest.packing import pack_windows
    from sae.harvest.text import open_source

    source = open_source(text, None, "train", column)
    pending: list[torch.Tensor] = []
    given = 0
    for window in pack_windows(source, tokenizer, context):
        if given >= n_tokens:
            break
        if len(window.ids) != context:  # the short tail window; keep batches rectangular
            continue
        pending.append(torch.from_numpy(window.ids.astype("int64")))
        given += context
        if len(pending) == batch:
            yield torch.stack(pending).to(device)
            pending = []
    if pending:
        yield torch.stack(pending).to(device)
