"""Tokenize documents and pack them into fixed-length windows, in a background thread.

Each window is ``[BOS] + (context - 1)`` tokens of the document stream, where every document is
followed by EOS as a separator and a document longer than a window continues in the next one.
A window's place in the stream is ``StreamPos(doc, offset)`` (its first content token is token
``offset`` of document ``doc``'s token list), which is all a resume needs: restart the source at
``doc``, drop ``offset`` tokens. Windows are numbered globally; with several ranks, window i
belongs to rank ``i % world_size``, so the union over ranks is exactly one process's windows.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sae.errors import SaeError
from sae.harvest.text import TextSource


@dataclass(frozen=True)
class StreamPos:
    """The next token to pack: token ``offset`` of document ``doc`` (doc tokens end with EOS)."""

    doc: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Window:
    """One packed window: global index, token ids (int32, starts with BOS) and where it started."""

    index: int
    ids: np.ndarray
    start: StreamPos


def special_ids(tokenizer) -> tuple[int, int]:
    """(BOS, separator) ids; tokenizers without a BOS (GPT-2) use EOS for both."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if bos is None and eos is None:
        raise SaeError("the tokenizer has neither a BOS nor an EOS token; cannot delimit windows")
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def pack_windows(
    source: TextSource,
    tokenizer,
    context: int,
    *,
    start: StreamPos = StreamPos(),
    first_window: int = 0,
    rank: int = 0,
    world_size: int = 1,
    docs_per_batch: int = 64,
) -> Iterator[Window]:
    """Windows ``first_window, first_window+1, ...`` that belong to ``rank``, packed from ``start``.

    The last window of a finite dataset may be shorter than ``context``.
    """
    if context < 2:
        raise SaeError("--context must be at least 2 (BOS + one token)")
    bos, sep = special_ids(tokenizer)
    docs = _tokenized_docs(source, tokenizer, sep, start, docs_per_batch)
    pending: deque[tuple[int, np.ndarray]] = deque()  # (doc index, remaining tokens)
    head_offset = start.offset  # offset of pending[0]'s first remaining token in its document
    exhausted = False
    index = first_window
    need = context - 1

    def fill() -> bool:
        nonlocal exhausted
        if exhausted:
            return False
        try:
            pending.append(next(docs))
            return True
        except StopIteration:
            exhausted = True
            return False

    while True:
        if not pending and not fill():
            return
        window_start = StreamPos(pending[0][0], head_offset)
        mine = index % world_size == rank
        parts: list[np.ndarray] = [np.array([bos], dtype=np.int32)]
        taken = 0
        while taken < need:
            if not pending and not fill():
                break
            doc, tokens = pending[0]
            take = min(need - taken, len(tokens))
            if mine:
                parts.append(tokens[:take])
            taken += take
            if take == len(tokens):
                pending.popleft()
                head_offset = 0
            else:
                pending[0] = (doc, tokens[take:])
                head_offset += take
        if taken == 0:
            return
        if mine:
            yield Window(index, np.concatenate(parts), window_start)
        index += 1


def _tokenized_docs(
    source: TextSource, tokenizer, sep: int, start: StreamPos, docs_per_batch: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(doc index, int32 tokens + separator), tokenized a batch of documents at a time."""
    batch: list[tuple[int, str]] = []
    first = True

    def flush() -> Iterator[tuple[int, np.ndarray]]:
        nonlocal first
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
        for (doc, _), ids in zip(batch, encoded, strict=True):
            tokens = np.empty(len(ids) + 1, dtype=np.int32)
            tokens[:-1] = ids
            tokens[-1] = sep
            if first:
                if doc != start.doc and start.offset:
                    raise SaeError(
                        f"cannot resume: document {start.doc} of the dataset is gone or empty; "
                        "the dataset changed since the cache was started (use --overwrite)"
                    )
                tokens = tokens[start.offset :] if doc == start.doc else tokens
                first = False
            if len(tokens):
                yield doc, tokens
        batch.clear()

    size = 1  # grows to docs_per_batch: the first window comes quickly, later ones in bulk
    for doc, text in source.documents(start.doc):
        batch.append((doc, text))
        if len(batch) >= size:
            yield from flush()
            size = min(2 * size, docs_per_batch)
    if batch:
        yield from flush()


class Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead, so tokenization overlaps the GPU.

    Errors raised in the thread are re-raised in the consumer.
    """

    _END = object()

    def __init__(self, items: Iterator, depth: int = 64) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # re-raised in the consumer thread
            self._put(err)

    def _put(self, item) -> bool:
        """Queue ``item`` unless the consumer closed us first (then return False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
