"""The activation store against real zarr stores in tmp dirs and memory://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import SaeError
from sae.store import CacheWriter, open_cache
from sae.store.verify import verify_cache

D = 16
CONTEXT = 8
IDENTITY = {
    "model": "tiny",
    "model_revision": "r1",
    "layer": 3,
    "hook": "resid_post",
    "d_model": D,
    "dtype": "float32",
    "context": CONTEXT,
    "tokenizer": "tiny",
    "dataset": "local",
    "dataset_config": None,
    "split": "train",
    "text_column": "text",
    "seed": 0,
}


NOISE = np.random.default_rng(0).standard_t(3, size=(4999, 2 * D)).astype(np.float32)


def rows_for(start: int, n: int, d: int = D) -> np.ndarray:
    """Rows that say which global row they are (cols 0,1 exact in fp16) plus heavy-tailed noise."""
    idx = np.arange(start, start + n)
    x = NOISE[idx % len(NOISE), :d].copy()
    x[:, 0], x[:, 1] = idx // 1000, idx % 1000
    return x


def row_ids(batch: torch.Tensor) -> np.ndarray:
    b = batch.float().numpy()
    return (b[:, 0] * 1000 + b[:, 1]).astype(np.int64)


def write(
    url: str,
    n: int,
    *,
    total: int | None = None,
    rank: int = 0,
    world: int = 1,
    step: int = 100,
    offset: int = 0,
    **kw,
) -> CacheWriter:
    total = total or n
    w = CacheWriter(
        url,
        d_model=D,
        total_tokens=total,
        identity=IDENTITY,
        attrs={"note": "test"},
        chunk_rows=32,
        shard_rows=64,
        rank=rank,
        world_size=world,
        **kw,
    )
    start = w.committed
    for i in range(start, n, step):
        k = min(step, n - i)
        g = offset + i
        w.append(
            torch.from_numpy(rows_for(g, k)),
            np.arange(g, g + k) % 50000,
            np.arange(g, g + k) % CONTEXT,
            state={"next": i + k},
        )
    w.close()
    return w


def append_rows(w: CacheWriter, local_start: int, local_stop: int, step: int) -> None:
    """Append this writer's rows [local_start, local_stop) in steps (token id = global row)."""
    for i in range(local_start, local_stop, step):
        g, k = w.row_start + i, min(step, local_stop - i)
        w.append(rows_for(g, k), np.arange(g, g + k), np.arange(g, g + k) % CONTEXT)


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    return str(tmp_path / "cache") if request.param == "local" else f"memory://c-{uuid.uuid4().hex}"


def test_round_trip_bit_exact(url):
    n = 1000
    w = write(url, n)
    assert w.committed == n and w.resume_state == (n, {"next": n})
    cache = open_cache(url)
    assert cache.n_tokens == n and cache.d_model == D and cache.layer == 3 and cache.model == "tiny"
    x = rows_for(0, n)
    np.testing.assert_array_equal(cache.read_rows(0, n), x.astype(np.float16))
    np.testing.assert_array_equal(cache.read_rows(123, 457), x[123:457].astype(np.float16))
    np.testing.assert_array_equal(cache.token_ids(0, n), np.arange(n) % 50000)
    np.testing.assert_array_equal(cache.positions(0, n), np.arange(n) % CONTEXT)
    st = cache.stats
    assert st["count"] == n and st["nonfinite"] == 0 and st["overflow"] == 0
    np.testing.assert_allclose(st["mean"], x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st["mean_sq_norm"], (x.astype(np.float64) ** 2).sum(1).mean())
    assert st["max_abs"] == pytest.approx(np.abs(x).max())
    assert cache.attrs["config"] == {"note": "test"} and cache.identity == IDENTITY
    info = CliRunner().invoke(app, ["store", "info", url])
    assert info.exit_code == 0, info.output
    assert "tiny" in info.output and "1,000 / 1,000" in info.output and "resid_post" in info.output


def test_plain_zarr_reads_without_sae(tmp_path):
    path = tmp_path / "cache"
    write(str(path), 300)
    script = textwrap.dedent(f"""
        import json, sys, zarr
        g = zarr.open_group({str(path)!r}, mode="r")
        a = g["activations"]
        print(json.dumps({{"shape": list(a.shape), "dtype": str(a.dtype), "all": a[:].tolist(),
                          "tok": int(g["token_ids"][7]), "model": g.attrs["identity"]["model"],
                          "committed": g.attrs["tokens_committed"],
                          "w0": g["writers/rank-00000"].attrs["committed"],
                          "sae": "sae" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["shape"] == [300, D] and got["dtype"] == "float16" and not got["sae"]
    np.testing.assert_array_equal(
        np.array(got["all"], np.float16), rows_for(0, 300).astype(np.float16)
    )
    assert (
        got["tok"] == 7 and got["model"] == "tiny" and got["committed"] == 300 and got["w0"] == 300
    )


KILL_WRITER = """
import sys, time, numpy as np, torch
sys.path.insert(0, {tests!r})
from test_store import write_slowly
write_slowly({path!r})
"""


def write_slowly(path: str, total: int = 4000) -> None:
    """Used by the SIGKILL test's subprocess: appends forever-ish, one small step at a time."""
    w = CacheWriter(
        path,
        d_model=D,
        total_tokens=total,
        identity=IDENTITY,
        attrs={},
        chunk_rows=32,
        shard_rows=64,
    )
    for i in range(w.committed, total, 10):
        w.append(
            rows_for(i, 10),
            np.arange(i, i + 10),
            np.arange(i, i + 10) % CONTEXT,
            state={"next": i + 10},
        )
        time.sleep(0.002)
    w.close()


def test_sigkill_mid_write_then_resume(tmp_path):
    path = str(tmp_path / "cache")
    code = KILL_WRITER.format(tests=str(Path(__file__).parent), path=path)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    rec = tmp_path / "cache" / "writers" / "rank-00000" / "zarr.json"
    while time.time() < deadline:
        if rec.exists() and json.loads(rec.read_text())["attributes"]["committed"] >= 640:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = open_cache(path)
    n = cache.n_tokens
    assert 640 <= n < 4000 and n % 64 == 0  # commits are whole shards
    np.testing.assert_array_equal(cache.read_rows(0, n), rows_for(0, n).astype(np.float16))
    # resume: the writer continues at the committed count; the stream restarts from its state
    w = CacheWriter(
        path,
        d_model=D,
        total_tokens=4000,
        identity=IDENTITY,
        attrs={},
        chunk_rows=32,
        shard_rows=64,
    )
    rows, state = w.resume_state
    assert w.committed == n and state == {"next": rows} and rows <= n
    append_rows(w, n, 4000, 10)
    w.close()
    cache = open_cache(path)
    assert cache.n_tokens == 4000 and cache.stats["count"] == 4000
    np.testing.assert_array_equal(cache.read_rows(0, 4000), rows_for(0, 4000).astype(np.float16))
    np.testing.assert_array_equal(cache.token_ids(0, 4000), np.arange(4000))


def test_partial_tail_commit_resumes(url):
    w = CacheWriter(
        url, d_model=D, total_tokens=500, identity=IDENTITY, attrs={}, chunk_rows=32, shard_rows=64
    )
    with pytest.raises(RuntimeError), w:
        w.append(rows_for(0, 100), np.arange(100), np.arange(100) % CONTEXT)
        raise RuntimeError("harvest crashed")
    assert open_cache(url).n_tokens == 100  # appended rows were fully written before commit
    write(url, 500)
    np.testing.assert_array_equal(
        open_cache(url).read_rows(0, 500), rows_for(0, 500).astype(np.float16)
    )


def test_verify_names_flipped_chunk(tmp_path):
    path = tmp_path / "cache"
    write(str(path), 1000)
    runner = CliRunner()
    ok = runner.invoke(app, ["store", "verify", str(path)])
    assert ok.exit_code == 0, ok.output
    info = runner.invoke(app, ["store", "info", str(path)])
    assert info.exit_code == 0 and "tiny" in info.output and "1,000" in info.output
    # chunk 5 = rows 160..191 = shard 2, inner chunk 1; data starts after inner chunk 0 (+crc)
    shard = path / "activations" / "c" / "2" / "0"
    raw = bytearray(shard.read_bytes())
    raw[32 * D * 2 + 4 + 100] ^= 0x10
    shard.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["store", "verify", str(path)])
    assert bad.exit_code == 1
    assert "corrupted chunks: 5" in bad.output
    with pytest.raises(SaeError, match="checksum"):
        open_cache(str(path)).read_rows(150, 200)


def test_every_writer_gets_rows_and_rank_0_a_heldout_split(url):
    """Writers own whole token chunks (16 shards). With the default sizes a small cache for two
    writers used to give rank 0 nothing, so it had no held-out split; the defaults now shrink.
    Sizes given explicitly that leave a writer empty are refused with what to do."""
    from sae.store.layout import make_layout

    layout = make_layout(40_000, 64, 2, None, None)
    assert [layout.rank_rows(r) > 0 for r in (0, 1)] == [True, True]
    assert 0 < layout.heldout_rows <= layout.rank_rows(0) // 2
    assert make_layout(40_000, 64, 1, None, None).shard_rows == 40_000  # one writer: as before
    big = make_layout(10**9, 2304, 8, None, None)
    assert (big.chunk_rows, big.shard_rows) == (2048, 65536)  # real sizes: the measured defaults
    tiny = make_layout(300, 64, 2, None, None)  # chunks stay >= 16 rows: a held-out split remains
    assert (tiny.chunk_rows, tiny.rank_rows(0), tiny.heldout_rows) == (16, 256, 16)
    for total, sizes, least in ((4000, (64, 256), 4097), (40, (None, None), 257)):
        with pytest.raises(
            SaeError, match=rf"writer\(s\) \[0\] without rows: .* least {least} tok"
        ):
            CacheWriter(url, d_model=D, total_tokens=total, identity=IDENTITY, attrs={},
                        chunk_rows=sizes[0], shard_rows=sizes[1], world_size=2)  # fmt: skip
    for rank in (0, 1):
        w = CacheWriter(
            url, d_model=D, total_tokens=4000, identity=IDENTITY, attrs={}, rank=rank, world_size=2
        )
        append_rows(w, 0, w.target, 500)
        w.close()
    cache = open_cache(url)
    assert cache.n_tokens == 4000 and cache.heldout_rows[1] > 0


def test_cache_of_an_older_sae_with_an_empty_writer_still_resumes(tmp_path):
    """A cache an older sae made with writer 0 empty (now refused at creation) keeps its stored
    layout: writer 1 still opens and finishes it."""
    from sae.store.layout import Layout
    from sae.store.location import locate
    from sae.store.writer import create_cache

    url = str(tmp_path / "old")
    create_cache(locate(url), Layout(3000, D, 32, 256, 2), IDENTITY, {}, None)
    w = CacheWriter(url, d_model=D, total_tokens=3000, identity=IDENTITY, attrs={},
                    chunk_rows=32, shard_rows=256, rank=1, world_size=2)  # fmt: skip
    assert (w.row_start, w.target) == (0, 3000)
    append_rows(w, 0, 3000, 1000)
    w.close()
    assert open_cache(url).n_tokens == 3000


def test_writers_whose_input_ran_out_still_get_the_summary(url):
    """Several writers stopping short of their ranges (the dataset ran out) are done once each
    says so: the plain-zarr summary then counts their rows instead of staying at 0; a writer
    reopened to write more is no longer finished until it says so again."""

    def group_attrs() -> dict:
        return open_cache(url).attrs

    shape = dict(d_model=D, total_tokens=4096, identity=IDENTITY, attrs={}, chunk_rows=32,
                 shard_rows=64, world_size=2)  # fmt: skip
    kept = {0: 300, 1: 200}
    for rank in (0, 1):
        w = CacheWriter(url, rank=rank, **shape)
        append_rows(w, 0, kept[rank], 100)
        w.input_ended()
        w.close()
        # rank 0 alone finished: rank 1 may still write, so the summary is not taken yet
        assert group_attrs()["tokens_committed"] == (0 if rank == 0 else 500)
    cache = open_cache(url)
    assert cache.n_tokens == 500 and cache.attrs["stats"]["count"] == 500
    assert not verify_cache(cache).problems
    w = CacheWriter(url, rank=1, **shape)  # resumed with more text: active again
    assert not open_cache(url).records[1].finished  # from the moment it is opened
    append_rows(w, 200, 264, 64)
    assert group_attrs()["tokens_committed"] == 500
    w.close()  # closed without input_ended() (e.g. stopped by Ctrl-C): not finished
    assert group_attrs()["tokens_committed"] == 500 and open_cache(url).n_tokens == 564
    w = CacheWriter(url, rank=1, **shape)
    w.input_ended()
    w.close()
    assert group_attrs()["tokens_committed"] == 564


def test_every_data_file_is_synced_before_its_commit(tmp_path):
    """The files a local writer fsyncs before each commit are exactly the cache's data files
    (activation shards, token and position chunks), so none is left to the page cache; a file
    that is not there stops the writer with its error instead of a commit."""
    from sae.atomic import fsync_files

    url = tmp_path / "cache"
    w = CacheWriter(
        str(url),
        d_model=D,
        total_tokens=5000,
        identity=IDENTITY,
        attrs={},
        chunk_rows=32,
        shard_rows=128,
    )  # fmt: skip (3 token chunks of 16 shards)
    append_rows(w, 0, w.target, 1000)
    w.close()
    synced = set()
    for b0 in range(0, w.target, 128):  # the writer's blocks: one shard each
        synced |= set(w._files_of_rows(w.row_start + b0, w.row_start + min(b0 + 128, w.target)))
    written = {
        p.relative_to(url).as_posix()
        for p in url.rglob("*")
        if p.is_file() and "/c/" in p.relative_to(url).as_posix()
    }
    assert synced == written and any(k.startswith("activations/") for k in synced)
    fsync_files(url, sorted(synced))
    with pytest.raises(FileNotFoundError):
        fsync_files(url, ["token_ids/c/99"])


def test_more_ranks_than_chunks_is_refused_up_front(url):
    """Ranks read whole chunks: with 3 train chunks, a 4th rank would get none (it used to say
    "the split has no rows left after filtering", which the split does not)."""
    w = CacheWriter(
        url, d_model=D, total_tokens=128, identity=IDENTITY, attrs={}, chunk_rows=32, shard_rows=64
    )
    append_rows(w, 0, 128, 128)
    w.close()
    cache = open_cache(url)
    assert cache.heldout_rows == (0, 32)  # 3 chunks of 32 left for training
    with pytest.raises(SaeError, match=r"train split of .* has 3 chunk\(s\) of rows for 4 ranks"):
        cache.batches(8, rank=3, world_size=4)
    assert sum(len(row_ids(b)) for b in cache.batches(8, rank=2, world_size=3)) > 0
    # fewer kept rows per epoch than one batch: said, with the options that change it
    with pytest.raises(
        SaeError, match=r"rank 0 gets fewer than batch_size=200 rows per epoch .*--batch"
    ):
        next(iter(cache.batches(200, epochs=None)))


def test_two_ranks_disjoint_complete_and_deterministic(url):
    total = 4096  # token chunks of 16 shards * 64 rows = 1024 rows; 4 units over 2 ranks
    for rank in (0, 1):  # ranks write independently (could be separate processes/nodes)
        w = CacheWriter(
            url,
            d_model=D,
            total_tokens=total,
            identity=IDENTITY,
            attrs={},
            chunk_rows=32,
            shard_rows=64,
            rank=rank,
            world_size=2,
        )
        lo = rank * 2048
        assert w.target == 2048
        assert w.row_start == lo
        append_rows(w, 0, 2048, 256)
        w.close()
    cache = open_cache(url)
    assert cache.n_tokens == total
    h = cache.heldout_rows[1]
    kept = {i for i in range(h, total) if i % CONTEXT}
    seen = []
    for r in (0, 1):
        stream = cache.batches(
            64, seed=7, rank=r, world_size=2, drop_last=False, shuffle_rows=128, dtype=torch.float16
        )
        seen.append(np.concatenate([row_ids(b) for b in stream]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == sorted(kept)
    again = np.concatenate(
        [
            row_ids(b)
            for b in cache.batches(
                64, seed=7, rank=0, world_size=2, drop_last=False, shuffle_rows=128
            )
        ]
    )
    np.testing.assert_array_equal(again, seen[0])
    other = np.concatenate(
        [
            row_ids(b)
            for b in cache.batches(
                64, seed=8, rank=0, world_size=2, drop_last=False, shuffle_rows=128
            )
        ]
    )
    assert not np.array_equal(other, seen[0])
    held = np.concatenate([row_ids(b) for b in cache.batches(16, split="heldout", drop_last=False)])
    assert sorted(held.tolist()) == [i for i in range(h) if i % CONTEXT]
    with_bos = np.concatenate(
        [row_ids(b) for b in cache.batches(16, split="heldout", keep_bos=True, drop_last=False)]
    )
    assert sorted(with_bos.tolist()) == list(range(h))


def test_cursor_resumes_same_stream(tmp_path):
    url = str(tmp_path / "cache")
    write(url, 2000)
    cache = open_cache(url)
    full = [row_ids(b) for b in cache.batches(50, seed=3, epochs=2, shuffle_rows=96)]
    stream = cache.batches(50, seed=3, epochs=2, shuffle_rows=96)
    first = []
    for b in stream:
        first.append(row_ids(b))
        if len(first) == len(full) // 2 + 3:
            break
    cursor = json.loads(json.dumps(stream.cursor()))
    stream.close()
    rest = [row_ids(b) for b in cache.batches(50, seed=3, epochs=2, shuffle_rows=96, cursor=cursor)]
    assert len(first) + len(rest) == len(full)
    for a, b in zip(first + rest, full, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SaeError, match="seed"):
        cache.batches(50, seed=4, cursor=cursor)
    # closing a stream mid-epoch stops its loader and batcher threads
    import threading

    before = threading.active_count()
    stream = cache.batches(50, epochs=None, shuffle_rows=96)
    it = iter(stream)
    next(it)
    stream.close()

    def threads_settle() -> int:
        deadline = time.time() + 5
        while threading.active_count() > before and time.time() < deadline:
            time.sleep(0.05)
        return threading.active_count()

    assert threads_settle() == before
    # ... and so does leaving a loop over a stream that is never closed (a notebook's `break`)
    for _ in cache.batches(50, epochs=None, shuffle_rows=96):
        break
    assert threads_settle() == before


def test_mismatched_config_refused(url):
    write(url, 200)
    shape = {"total_tokens": 200, "attrs": {}, "chunk_rows": 32, "shard_rows": 64}
    with pytest.raises(SaeError, match="d_model"):
        CacheWriter(url, d_model=D * 2, identity={**IDENTITY, "d_model": D * 2}, **shape)
    with pytest.raises(SaeError, match="layer=3 in the cache, 4 now"):
        CacheWriter(url, d_model=D, identity={**IDENTITY, "layer": 4}, **shape)
    w = CacheWriter(url, d_model=D, identity={**IDENTITY, "layer": 4}, overwrite=True, **shape)
    assert w.committed == 0
    with pytest.raises(SaeError, match=r"expected \(n, 16\)"):
        w.append(np.zeros((4, 8), np.float32), np.arange(4), np.arange(4))
    with pytest.raises(SaeError, match="more than its 200"):
        w.append(np.ones((201, D), np.float32), np.arange(201), np.arange(201))
    w.close()


def test_fp16_overflow_and_nonfinite_counted(tmp_path):
    url = str(tmp_path / "cache")
    x = rows_for(0, 64)
    x[3, 5], x[4, 6], x[7, 2], x[8, 8] = 1e6, -7e4, np.nan, np.inf
    with CacheWriter(
        url, d_model=D, total_tokens=64, identity=IDENTITY, attrs={}, chunk_rows=32, shard_rows=64
    ) as w:
        w.append(torch.from_numpy(x).to(torch.bfloat16).float(), np.arange(64), np.arange(64) % 8)
    cache = open_cache(url)
    got = cache.read_rows(0, 64)
    assert np.isfinite(got).all()
    assert got[3, 5] == 65504 and got[4, 6] == -65504 and got[7, 2] == 0 and got[8, 8] == 0
    assert cache.stats["overflow"] == 2 and cache.stats["nonfinite"] == 2


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(SaeError, match="does not exist"):
        open_cache(str(tmp_path / "nope"))
    with pytest.raises(SaeError, match="cannot open 'nosuch://x/y'"):
        open_cache("nosuch://x/y")
    with pytest.raises(SaeError, match=r"no zarr\.json"):
        open_cache(f"memory://absent-{uuid.uuid4().hex}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeError, match="not an sae activation cache"):
        open_cache(str(tmp_path / "empty"))
    path = tmp_path / "cache"
    write(str(path), 100)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SaeError, match="newer than this sae"):
        open_cache(str(path))
    meta["attributes"]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "token_ids" / "zarr.json").unlink()
    with pytest.raises(SaeError, match="lacks the 'token_ids' array"):
        open_cache(str(path))
    result = CliRunner().invoke(app, ["store", "info", str(tmp_path / "empty")])
    assert result.exit_code != 0


def test_sample_and_heldout_never_in_train(tmp_path):
    url = str(tmp_path / "cache")
    write(url, 3000)
    cache = open_cache(url)
    lo, hi = cache.heldout_rows
    assert lo == 0 and hi == 32  # ~1% of 3000 rounded up to a chunk
    train = np.concatenate([row_ids(b) for b in cache.batches(100, drop_last=False)])
    assert train.min() >= hi
    s = cache.sample(200, seed=1)
    assert s.shape == (200, D) and s.dtype == torch.float32
    with pytest.raises(SaeError, match="only"):
        cache.sample(100, split="heldout")


def test_concurrent_writers_and_safe_paths(tmp_path):
    """Rank 1 starts before rank 0 has created the cache; both write at once; union is complete."""
    import threading

    url = str(tmp_path / "cache")
    errors = []

    def run(rank: int) -> None:
        try:
            w = CacheWriter(
                url,
                d_model=D,
                total_tokens=4096,
                identity=IDENTITY,
                attrs={},
                chunk_rows=32,
                shard_rows=64,
                rank=rank,
                world_size=2,
                wait_s=20,
            )
            append_rows(w, 0, w.target, 128)
            w.close()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 0)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for t in threads:
        t.join()
    assert not errors
    cache = open_cache(url)
    # whichever writer finished last saw both records complete and wrote the summary
    assert cache.n_tokens == 4096 and cache.attrs["tokens_committed"] == 4096
    assert cache.stats["count"] == 4096
    assert not verify_cache(cache).problems
    np.testing.assert_array_equal(cache.read_rows(0, 4096), rows_for(0, 4096).astype(np.float16))
    # a non-empty directory that is not a cache is never created over, nor deleted by overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(SaeError, match=r"not an sae cache|not empty"):
            CacheWriter(
                str(other),
                d_model=D,
                total_tokens=64,
                identity=IDENTITY,
                attrs={},
                overwrite=overwrite,
            )
    assert (other / "notes.txt").read_text() == "keep me"


def test_reader_checksum_is_crc32c_as_zarr_stores_it():
    """The reader's CRC-32C (GIL-releasing `crc32c` package) equals zarr's google_crc32c on
    bytes and on the numpy views the reader passes, and the standard check value."""
    import google_crc32c

    from sae.store.rows import crc32c

    assert crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng()
    data = rng.integers(0, 256, size=300_000, dtype=np.uint8)  # above the GIL-release size
    for view in (data, data[17:], data[:1000], data.tobytes()):
        assert crc32c(view) == google_crc32c.value(bytes(view))


@pytest.mark.parametrize("where", ["after_the_statistics", "awaiting_a_free_block"])
def test_interrupted_append_leaves_a_readable_resumable_cache(tmp_path, monkeypatch, where):
    """Ctrl-C inside append() (a KeyboardInterrupt between two of its statements): `with` still
    closes the writer, which must not commit the half-updated tail; the rest is re-harvested."""
    import sae.store.writer as writer_module

    url, n = str(tmp_path / "cache"), 1000
    w = CacheWriter(url, d_model=D, total_tokens=n, identity=IDENTITY, attrs={},
                    chunk_rows=32, shard_rows=64)  # fmt: skip
    calls = {"n": 0}
    if where == "after_the_statistics":  # the block's statistics count rows its fill does not
        sanitize = writer_module.sanitize_block

        def sanitize_then_stop(*args):
            sanitize(*args)
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt

        monkeypatch.setattr(writer_module, "sanitize_block", sanitize_then_stop)
    else:  # a full block is queued; the interrupt comes while waiting for a free one
        get = w._free.get

        def get_then_stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return get(*args, **kwargs)

        monkeypatch.setattr(w._free, "get", get_then_stop)
    with pytest.raises(KeyboardInterrupt), w:
        for i in range(0, n, 100):
            w.append(rows_for(i, 100), np.arange(i, i + 100), np.arange(i, i + 100) % CONTEXT)
    monkeypatch.undo()
    cache = open_cache(url)
    done = cache.n_tokens
    assert 0 < done < n and done % 64 == 0 and cache.stats["count"] == done
    w = write(url, n)  # resumes from the record
    assert w.committed == n
    cache = open_cache(url)
    np.testing.assert_array_equal(cache.read_rows(0, n), rows_for(0, n).astype(np.float16))
    assert not verify_cache(cache).problems


def test_overwrite_with_several_writers_waits_for_rank_0(tmp_path):
    """Rank 1 reaches the old cache first; it must not resume its record there, but open the
    cache that rank 0 creates in its place (the barrier is torchrun's in `sae harvest`)."""
    import threading

    url = str(tmp_path / "cache")
    shape = {"d_model": D, "total_tokens": 4096, "identity": IDENTITY, "attrs": {},
             "chunk_rows": 32, "shard_rows": 64, "world_size": 2}  # fmt: skip
    old = [CacheWriter(url, rank=r, **shape) for r in (0, 1)]
    append_rows(old[0], 0, old[0].target, 128)
    append_rows(old[1], 0, 1024, 128)  # the old run stopped half-way through rank 1's rows
    for w in old:
        w.close()
    with pytest.raises(SaeError, match=r"several writers .* torchrun"):
        CacheWriter(url, rank=1, overwrite=True, **shape)
    barrier, opened, errors = threading.Barrier(2), {}, []

    def run(rank: int) -> None:
        try:
            if rank == 0:
                time.sleep(0.3)  # rank 1 gets there first
            w = CacheWriter(url, rank=rank, overwrite=True, barrier=barrier.wait, **shape)
            opened[rank] = w.committed
            append_rows(w, w.committed, w.target, 128)
            w.close()
        except Exception as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and opened == {0: 0, 1: 0}
    cache = open_cache(url)
    np.testing.assert_array_equal(cache.read_rows(0, 4096), rows_for(0, 4096).astype(np.float16))
    assert not verify_cache(cache).problems


@pytest.mark.parametrize("where", ["memory", "local-zstd"])
def test_missing_shard_is_named_not_read_as_zeros(tmp_path, where):
    """Through zarr (remote or compressed caches) a shard object that is gone would read as its
    fill value: verify names it and reading its rows fails."""
    from sae.store.rows import ChunkCorrupt

    if where == "memory":
        url = f"memory://gone-{uuid.uuid4().hex}"
        write(url, 512)
        fsspec.filesystem("memory").rm(f"/{url.removeprefix('memory://')}/activations/c/3/0")
    else:
        url = str(tmp_path / "cache")
        write(url, 512, compression="zstd")
        (tmp_path / "cache" / "activations" / "c" / "3" / "0").unlink()
    cache = open_cache(url)
    report = verify_cache(cache)
    assert report.problems == [
        "activations shard 3 is missing: its committed rows would read as zeros; "
        "copy the cache again from its source"
    ]
    assert report.corrupted == [6, 7]  # its two 32-row chunks
    np.testing.assert_array_equal(cache.read_rows(0, 192), rows_for(0, 192).astype(np.float16))
    with pytest.raises(ChunkCorrupt, match="activation shard 3 is missing"):
        cache.read_rows(150, 200)


@pytest.mark.parametrize("where", ["local", "local-zstd", "local-blosc", "memory"])
def test_a_shard_of_zeros_is_written_like_any_other(tmp_path, where):
    """A model that emits NaN for a whole shard gets it sanitised to zeros; zarr skips writing an
    all-fill-value shard unless the array was opened to write empty chunks, and the cache then
    reported it missing (and the local writer's fsync could not find it)."""
    import zarr

    url = f"memory://zeros-{uuid.uuid4().hex}" if where == "memory" else str(tmp_path / "c")
    compression = where.split("-")[1] if "-" in where else None
    before = zarr.config.get("array.write_empty_chunks")
    w = CacheWriter(url, d_model=D, total_tokens=192, identity=IDENTITY, attrs={},
                    chunk_rows=32, shard_rows=64, compression=compression)  # fmt: skip
    nan = np.full((64, D), np.nan, np.float32)
    for g, x in ((0, rows_for(0, 64)), (64, nan), (128, rows_for(128, 64))):
        w.append(x, np.arange(g, g + 64), np.arange(g, g + 64) % CONTEXT)
    w.close()
    assert zarr.config.get("array.write_empty_chunks") == before  # no process-wide change
    cache = open_cache(url)
    assert cache.n_tokens == 192 and not verify_cache(cache).problems
    got = cache.read_rows(0, 192)
    assert not got[64:128].any()
    np.testing.assert_array_equal(got[128:], rows_for(128, 64).astype(np.float16))


def test_durable_replace_keeps_the_old_file_when_a_write_fails(tmp_path):
    """The writer's zarr store rewrites token chunks that hold committed rows through
    durable_replace: a write that fails part-way leaves the old file whole and no temporary."""
    from sae.atomic import durable_replace
    from sae.store.location import locate

    path = tmp_path / "token_ids" / "c" / "0"
    durable_replace(path, b"committed rows")
    with pytest.raises(TypeError):
        durable_replace(path, object())  # not a buffer: fails inside the write
    assert path.read_bytes() == b"committed rows"
    assert sorted(p.name for p in path.parent.iterdir()) == ["0"]
    store = locate(str(tmp_path)).store(durable=True)
    assert type(store).__name__ == "DurableLocalStore"
    assert type(locate(str(tmp_path)).store(read_only=True)).__name__ == "LocalStore"
    from zarr.core.buffer import default_buffer_prototype

    from sae.store.durable_store import DurableLocalStore

    ro = DurableLocalStore(tmp_path, read_only=True)
    with pytest.raises(ValueError, match="'token_ids/c/0': the store was opened read-only"):
        ro.set_sync("token_ids/c/0", default_buffer_prototype().buffer.from_bytes(b"x"))
    assert path.read_bytes() == b"committed rows"


def test_creation_cut_short_is_created_over(tmp_path, monkeypatch):
    """Killed inside create_cache (arrays made, attributes not yet written): the next run
    creates the cache over it, with or without overwrite; anything else there is kept."""
    from zarr.core.attributes import Attributes

    url = str(tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(Attributes, "put", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            write(url, 256)
    assert json.loads((tmp_path / "cache" / "zarr.json").read_text())["attributes"] == {}
    w = write(url, 256)
    assert w.committed == 256
    np.testing.assert_array_equal(
        open_cache(url).read_rows(0, 256), rows_for(0, 256).astype(np.float16)
    )
    # the same half-made group plus a file of someone else's is not ours to delete
    other = tmp_path / "other"
    with monkeypatch.context() as patch:
        patch.setattr(Attributes, "put", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            write(str(other), 256)
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(SaeError, match="not an sae cache"):
            write(str(other), 256, overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "keep me"


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _set_codec(meta: dict) -> None:
    meta["codecs"][0]["configuration"]["codecs"][1] = {"name": "not-a-codec"}


def _record_stats_nan(meta: dict) -> None:
    meta["attributes"]["stats"]["sum_sq_norm"] = float("nan")  # json.dumps writes NaN


DAMAGE = {  # file under the cache, its edit, what the error must say
    "unknown codec": ("activations/zarr.json", _set_codec, "cannot open the 'activations'"),
    "NaN in a record": ("writers/rank-00000/zarr.json", _record_stats_nan, "NaN is not a JSON"),
    "resume rows true": (
        "writers/rank-00000/zarr.json",
        lambda m: m["attributes"]["resume"].update(rows=True),
        "resume rows True",
    ),
    "world size 1e12": (
        "zarr.json",
        lambda m: m["attributes"].update(world_size=10**12),
        "world_size=1000000000000 exceeds",
    ),
    "d_model 2**40": ("zarr.json", lambda m: m["attributes"].update(d_model=2**40), "d_model="),
    "chunk rows 2**45": (
        "zarr.json",
        lambda m: m["attributes"].update(chunk_rows=2**45, shard_rows=2**45),
        "chunk bytes=",
    ),
    "chunk rows off the grid": (
        "zarr.json",
        lambda m: m["attributes"].update(chunk_rows=64),
        r"chunks \(32, 16\) .* not the \(64, 16\)",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_metadata_is_a_clear_error(tmp_path, damage):
    """Metadata is untrusted input: each damage ends in an SaeError that names it (no
    traceback from zarr or numpy, no hang, no huge allocation)."""
    url = tmp_path / "cache"
    write(str(url), 256)
    key, edit, message = DAMAGE[damage]
    _edit_json(url / key, edit)
    with pytest.raises(SaeError, match=message):
        open_cache(str(url)).read_rows(0, 4)


def test_damaged_paths_and_shard_index_are_clear_errors(tmp_path):
    from sae.store.rows import ChunkCorrupt, crc32c

    odd = tmp_path / "odd"
    (odd / "zarr.json").mkdir(parents=True)
    with pytest.raises(SaeError, match="Is a directory"):
        open_cache(str(odd))
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": ["format"]}'
    )
    with pytest.raises(SaeError, match="not an sae cache; refusing to delete"):
        write(str(listed), 64, overwrite=True)
    # a shard index entry whose offset + size wraps around 2**64, with a valid index checksum
    url = tmp_path / "cache"
    write(str(url), 256)
    shard = url / "activations" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    inner = 64 // 32
    index = np.frombuffer(bytes(raw[-inner * 16 - 4 : -4]), "<u8").reshape(inner, 2).copy()
    index[0, 0] = np.uint64(2**64 - int(index[0, 1]) + 1)
    raw[-inner * 16 - 4 : -4] = index.tobytes()
    raw[-4:] = int(crc32c(np.frombuffer(index.tobytes(), np.uint8))).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorrupt, match=r"index entry .* is inconsistent"):
        open_cache(str(url)).read_rows(0, 4)
    assert "is inconsistent" in verify_cache(open_cache(str(url))).problems[0]


def test_cache_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SaeError, match=r"afile/cache/zarr\.json: Not a directory"):
        write(str(tmp_path / "afile" / "cache"), 64)
    assert (tmp_path / "afile").read_text() == "mine"
    if Path("/proc/self").is_dir():  # nothing can be created under /proc, even by root
        with pytest.raises(SaeError, match="cannot create a cache at /proc/no-cache-here"):
            write("/proc/no-cache-here", 64)
