"""sae.harvest without the store: model cut at a layer, text sources, packing (CPU, tiny models)."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
from tinylm import N_LAYERS, make_tiny_lm

from sae.errors import SaeError
from sae.harvest.model import decoder_blocks, load_layer_model, load_tokenizer
from sae.harvest.packing import Prefetcher, StreamPos, pack_windows, special_ids
from sae.harvest.text import LocalFilesSource, PythonDocsSource, open_source

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_lm(tmp_path_factory.mktemp("tinylm")))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny)


def test_python_docs_is_real_deterministic_text():
    source = PythonDocsSource()
    first = list(islice(source.documents(), 5))
    again = list(islice(PythonDocsSource().documents(), 5))
    assert first == again
    assert all(len(text) > 0 for _, text in first)
    assert any(" the " in text for _, text in first)  # prose, not code
    # Restarting at a document index yields the same documents from there on.
    index = first[2][0]
    assert list(islice(source.documents(index), 3)) == first[2:5]


@pytest.mark.parametrize("layer", [0, 1, N_LAYERS - 1])
def test_layer_output_equals_hidden_states(tiny, tokenizer, layer):
    from transformers import AutoModelForCausalLM

    lm = load_layer_model(tiny, layer, device=CPU, dtype=torch.float32)
    blocks, _ = decoder_blocks(lm.model, layer + 1)
    assert len(blocks) == layer + 1  # later blocks are gone
    windows = list(islice(pack_windows(PythonDocsSource(), tokenizer, 96), 4))
    ids = torch.from_numpy(np.stack([w.ids for w in windows]).astype(np.int64))
    got = lm(ids)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states
    assert got.shape == (4, 96, lm.d_model)
    if layer < N_LAYERS - 1:
        torch.testing.assert_close(got, hidden[layer + 1], rtol=1e-5, atol=1e-5)
    else:
        # HF's last hidden state has the final norm applied; we harvest the block's raw output.
        assert not torch.allclose(got, hidden[-1])
        outputs = []
        blocks, _ = decoder_blocks(reference, N_LAYERS)
        blocks[layer].register_forward_hook(lambda _m, _i, out: outputs.append(out))
        with torch.no_grad():
            reference(ids)
        torch.testing.assert_close(got, outputs[0], rtol=1e-5, atol=1e-5)


def test_layer_out_of_range_names_depth(tiny):
    with pytest.raises(SaeError, match=rf"has {N_LAYERS} blocks.*0\.\.{N_LAYERS - 1}"):
        load_layer_model(tiny, N_LAYERS, device=CPU, dtype=torch.float32)


def test_missing_model_is_clear(tmp_path):
    with pytest.raises(SaeError, match="cannot load model"):
        load_layer_model(str(tmp_path / "nope"), 0, device=CPU, dtype=torch.float32)
    with pytest.raises(SaeError, match="no such GGUF file"):
        load_layer_model(str(tmp_path / "m.gguf"), 0, device=CPU, dtype=torch.float32)


def test_packing_windows_follow_the_token_stream(tokenizer):
    source = PythonDocsSource()
    bos, sep = special_ids(tokenizer)
    context = 64
    windows = list(islice(pack_windows(source, tokenizer, context), 40))
    assert [w.index for w in windows] == list(range(40))
    assert all(len(w.ids) == context and w.ids[0] == bos for w in windows)
    # Content = the documents tokenized without specials, each followed by the separator.
    stream: list[int] = []
    for _, text in source.documents():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
        if len(stream) > 40 * context:
            break
    content = np.concatenate([w.ids[1:] for w in windows])
    np.testing.assert_array_equal(content, stream[: len(content)])
    # A document longer than a window continues in the next one.
    assert any(w.start.offset > 0 for w in windows)
    # Restarting at any window's recorded position reproduces the rest exactly.
    k = next(i for i, w in enumerate(windows) if w.start.offset > 0)
    again = list(
        islice(pack_windows(source, tokenizer, context, start=windows[k].start, first_window=k), 5)
    )
    for a, b in zip(again, windows[k : k + 5], strict=True):
        assert a.index == b.index and a.start == b.start
        np.testing.assert_array_equal(a.ids, b.ids)


def test_ranks_split_windows_disjointly(tokenizer):
    source = PythonDocsSource()
    single = {w.index: w.ids for w in islice(pack_windows(source, tokenizer, 32), 30)}
    for rank in range(3):
        mine = list(islice(pack_windows(source, tokenizer, 32, rank=rank, world_size=3), 10))
        assert [w.index for w in mine] == list(range(rank, 30, 3))
        for w in mine:
            np.testing.assert_array_equal(w.ids, single[w.index])


def test_last_window_of_a_finite_dataset_is_short(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Hello world. " * 10)
    windows = list(pack_windows(LocalFilesSource(tmp_path), tokenizer, 1024))
    assert len(windows) == 1 and 2 < len(windows[0].ids) < 1024


def test_local_jsonl_parquet_txt_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "", "two"]))
    )
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five")
    (tmp_path / "ignored.csv").write_text("x")
    source = open_source(str(tmp_path), None, "train", "text")
    docs = list(source.documents())
    assert docs == [(0, "one"), (2, "two"), (3, "three"), (4, "four"), (5, "five")]
    assert list(source.documents(3)) == docs[2:]
    assert list(source.documents(4)) == docs[3:]


def test_missing_text_column_is_clear(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SaeError, match=r"no field 'text' \(has: body\).*--text-column"):
        list(open_source(str(tmp_path / "a.jsonl"), None, "train", "text").documents())
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(SaeError, match=r"no column 'text' \(columns: body\)"):
        list(open_source(str(tmp_path / "b.parquet"), None, "train", "text").documents())


def test_damaged_local_files_are_clear(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + b'\xe9"}\n')
    with pytest.raises(SaeError, match="line 1: not UTF-8 text"):
        list(open_source(str(tmp_path / "latin1.jsonl"), None, "train", "text").documents())
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(SaeError, match="not a readable parquet file"):
        list(open_source(str(tmp_path / "bad.parquet"), None, "train", "text").documents())


def test_context_longer_than_the_model_takes(tiny, tmp_path):
    from sae.harvest.config import HarvestConfig
    from sae.harvest.pipeline import run_harvest

    lm = load_layer_model(tiny, 0, device=CPU, dtype=torch.float32)
    assert lm.max_positions is not None
    config = HarvestConfig(model=tiny, layer=0, tokens=64, out=str(tmp_path / "cache"),
                           dataset="python-docs", context=lm.max_positions + 1, device="cpu")  # fmt: skip
    with pytest.raises(SaeError, match=f"--context {lm.max_positions + 1} is longer than the"):
        run_harvest(config, lm=lm)
    assert not (tmp_path / "cache").exists()  # refused before the cache is created


def test_bad_local_paths_are_clear(tmp_path):
    with pytest.raises(SaeError, match="no such file or folder"):
        open_source(str(tmp_path / "missing.jsonl"), None, "train", "text")
    with pytest.raises(SaeError, match=r"holds no \.jsonl"):
        open_source(str(tmp_path), None, "train", "text")


def test_prefetcher_reraises_errors_from_its_thread():
    def items():
        yield 1
        raise SaeError("boom")

    fetched = Prefetcher(items())
    assert next(fetched) == 1
    with pytest.raises(SaeError, match="boom"):
        next(fetched)


def test_stream_pos_resume_mid_document(tokenizer):
    source = PythonDocsSource()
    doc, text = next(iter(source.documents()))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    (window,) = islice(pack_windows(source, tokenizer, 8, start=StreamPos(doc, 3)), 1)
    np.testing.assert_array_equal(window.ids[1:], ids[3:10])
