"""Tiny, hub-free language models for tests: a random-init Gemma-2 and a byte-level BPE tokenizer.

Both are trained/built from local material only (the standard library's docstrings) and saved
with ``save_pretrained`` so that the code under test loads them exactly like a hub model.
Other components' tests import ``make_tiny_lm(dir)``.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

D_MODEL = 64
N_LAYERS = 3
VOCAB = 512
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, Gemma's order


def stdlib_texts(n_docs: int = 60) -> list[str]:
    """Real English: docstrings of the first ``n_docs`` stdlib modules that have some."""
    from sae.harvest.text import PythonDocsSource

    return [text for _, text in islice(PythonDocsSource().documents(), n_docs)]


def make_tokenizer(out_dir: str | Path, *, vocab_size: int = VOCAB):
    """Train a byte-level BPE on stdlib docstrings; save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def tiny_gemma(*, n_layers: int = N_LAYERS, seed: int = 0):
    """A random-init Gemma-2 with d_model 64 (vocabulary VOCAB), in eval mode."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def make_model(out_dir: str | Path, *, n_layers: int = N_LAYERS, seed: int = 0):
    """tiny_gemma, saved in fp32 safetensors."""
    model = tiny_gemma(n_layers=n_layers, seed=seed)
    model.save_pretrained(str(out_dir))
    return model


def make_tiny_lm(out_dir: str | Path, *, n_layers: int = N_LAYERS) -> Path:
    """Tokenizer + model in one folder, loadable with ``from_pretrained(out_dir)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    make_model(out, n_layers=n_layers)
    return out
