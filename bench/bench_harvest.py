"""Harvest throughput on one GPU: full `sae harvest` pipeline vs the forward alone vs the naive way.

Model: Gemma-2-2B's exact shape with random weights (no hub access), bf16, layer 12, context 1024.
Text: real documents from local parquet files, tokenized by a real BPE tokenizer (the harvest
tokenizes in its background thread; the two baselines get pre-tokenized windows, which favours
them). All three measured in the same process:

  (a) forward alone: the model cut after block 12, on GPU-resident token batches, nothing copied.
  harvest: `run_harvest` (packing thread, cut model, pinned side-stream D2H, store writer thread)
           writing a real cache to local disk.
  (b) naive: the full 26-block model with output_hidden_states=True, `.cpu()` of hidden_states[13]
           and a synchronous np.save per batch.

Usage (on the GPU machine):
  python bench/bench_harvest.py --corpus build/bench-corpus --tokenizer build/bench-tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from provenance import source_commit

# google/gemma-2-2b's architecture (its config.json values), without its weights.
GEMMA_2_2B = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


# A few-MB model of the same family, to smoke-test this script on CPU (--shape tiny).
TINY = {
    **GEMMA_2_2B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 14,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
}


def model_config(shape: str):
    from transformers import Gemma2Config

    return Gemma2Config(**(GEMMA_2_2B if shape == "gemma-2-2b" else TINY))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Gemma2ForCausalLM(model_config(shape))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def token_batches(corpus: str, tokenizer, context: int, batch: int, n_batches: int, device):
    from sae.harvest.packing import pack_windows
    from sae.harvest.text import open_source

    source = open_source(corpus, None, "train", "text")
    windows = list(islice(pack_windows(source, tokenizer, context), batch * n_batches))
    ids = torch.from_numpy(np.stack([w.ids for w in windows]).astype(np.int64))
    return [ids[i : i + batch].to(device) for i in range(0, len(ids), batch)]


def time_forward_alone(lm, batches) -> float:
    sync(lm.device)
    start = time.perf_counter()
    for ids in batches:
        lm(ids)
    sync(lm.device)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


@torch.inference_mode()
def time_naive(model, batches, layer: int, out_dir: Path) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    sync(batches[0].device)
    start = time.perf_counter()
    for i, ids in enumerate(batches):
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
        np.save(out_dir / f"{i:06d}.npy", hidden.to(torch.float16).cpu().numpy())
    elapsed = time.perf_counter() - start
    shutil.rmtree(out_dir)
    return sum(b.numel() for b in batches) / elapsed


def time_harvest(lm, tokenizer, args, out: str) -> float:
    from sae.harvest.config import HarvestConfig
    from sae.harvest.pipeline import run_harvest

    config = HarvestConfig(
        model="random-gemma-2-2b",
        layer=args.layer,
        tokens=args.harvest_tokens,
        out=out,
        dataset=args.corpus,
        context=args.context,
        batch_size=args.batch,
        device=args.device,
        overwrite=True,
        progress=False,
    )
    report = run_harvest(config, lm=lm, tokenizer=tokenizer)
    assert report.committed == args.harvest_tokens, report
    print(
        f"  harvest {report.seconds:.1f} s, main thread waited for the store "
        f"{report.store_wait_s:.1f} s, inside writer.append {report.append_s:.1f} s",
        flush=True,
    )
    return report.committed / report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="build/bench-corpus")
    parser.add_argument("--tokenizer", default="build/bench-tokenizer")
    parser.add_argument("--out", default="/tmp/bench-harvest")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--harvest-tokens", type=int, default=2_000_000)
    parser.add_argument("--forward-batches", type=int, default=100)
    parser.add_argument("--naive-batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["gemma-2-2b", "tiny"], default="gemma-2-2b")
    parser.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_harvest.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sae.harvest.model import cut_at_layer
    from sae.runtime import resolve_device

    device = resolve_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    batches = token_batches(
        args.corpus, tokenizer, args.context, args.batch, args.forward_batches, device
    )
    model = build_model(args.shape, device)
    attn = getattr(model.config, "_attn_implementation", "?")

    # (b) naive, full model: warm up, then measure.
    time_naive(model, batches[:3], args.layer, Path(args.out) / "naive")
    naive = [
        time_naive(model, batches[: args.naive_batches], args.layer, Path(args.out) / "naive")
        for _ in range(2)
    ]
    print(f"naive: {naive[0]:,.0f} {naive[1]:,.0f} tok/s", flush=True)
    # (a) and the harvest on the model cut after block `layer`, interleaved.
    lm = cut_at_layer(model, args.layer, device=device)
    time_forward_alone(lm, batches[:3])
    warm = argparse.Namespace(**{**vars(args), "harvest_tokens": args.batch * args.context * 4})
    time_harvest(lm, tokenizer, warm, f"{args.out}/cache")
    forward, harvest = [], []
    for i in range(args.repeats):
        forward.append(time_forward_alone(lm, batches))
        harvest.append(time_harvest(lm, tokenizer, args, f"{args.out}/cache"))
        print(
            f"repeat {i}: forward {forward[-1]:,.0f} tok/s, harvest {harvest[-1]:,.0f} tok/s",
            flush=True,
        )
    shutil.rmtree(args.out, ignore_errors=True)

    fwd, hv, nv = (statistics.median(x) for x in (forward, harvest, naive))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "commit": source_commit(),
        "attn_implementation": attn,
        "torch": torch.__version__,
        "batch_windows": args.batch,
        "context": args.context,
        "harvest_tokens_per_run": args.harvest_tokens,
        "forward_alone_tok_s": forward,
        "harvest_tok_s": harvest,
        "naive_tok_s": naive,
        "harvest_vs_forward": hv / fwd,
        "harvest_vs_naive": hv / nv,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"| path | tok/s (median) |\n|---|---|\n| (a) forward alone to layer {args.layer} | {fwd:,.0f} |"
    )
    print(f"| sae harvest (full pipeline, writes cache) | {hv:,.0f} |")
    print(f"| (b) naive: full model + hidden_states + sync writes | {nv:,.0f} |")
    print(f"harvest / (a) = {hv / fwd:.1%}   harvest / (b) = {hv / nv:.2f}x")


if __name__ == "__main__":
    main()
