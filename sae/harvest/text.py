"""Where the text comes from: Hugging Face datasets (streamed), local files, or the installed Python docs.

Every source yields ``(document_index, text)`` in a deterministic order and can restart at a
document index, which is all the resume logic needs: the stream position recorded in the cache is
``{doc, offset}`` (see ``packing.py``), so a source only has to skip documents cheaply.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from sae.errors import SaeError

PYTHON_DOCS = "python-docs"
LOCAL_SUFFIXES = (".jsonl", ".parquet", ".txt")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", ".git"}


class TextSource(Protocol):
    """A deterministic sequence of documents that can restart at any document index."""

    name: str

    def documents(self, start: int = 0) -> Iterator[tuple[int, str]]:
        """Yield (index, text) for documents ``start, start+1, ...``; indices may skip empty ones."""
        ...


# --------------------------------------------------------------------------------------------
# python-docs: the offline fallback, real English prose every Python install carries.


def python_source_files() -> list[Path]:
    """The .py files of the standard library, then of installed packages, in a stable order."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"]]
    seen_roots: set[str] = set()
    seen_files: set[str] = set()
    files: list[Path] = []
    for root in roots:
        real = os.path.realpath(root)
        if real in seen_roots or not os.path.isdir(real):
            continue
        seen_roots.add(real)
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    full = os.path.join(dirpath, name)
                    if full not in seen_files:
                        seen_files.add(full)
                        files.append(Path(full))
    return files


def docstrings_of(path: Path) -> str:
    """The module, class and function docstrings of one file, in source order, blank-line separated."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError, RecursionError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                parts.append(doc.strip())
    return "\n\n".join(parts)


class PythonDocsSource:
    """Docstrings of the installed Python packages, standard library first: one document per file.

    The document index is the file's index in ``python_source_files()`` (files without
    docstrings are skipped but keep their index), so restarting at document n costs nothing.
    """

    name = PYTHON_DOCS

    def __init__(self) -> None:
        self.files = python_source_files()
        if not self.files:
            raise SaeError("--dataset python-docs: found no Python source files on this machine")

    def documents(self, start: int = 0) -> Iterator[tuple[int, str]]:
        for index in range(start, len(self.files)):
            text = docstrings_of(self.files[index])
            if text:
                yield index, text


# --------------------------------------------------------------------------------------------
# Local files: one .txt file is one document; .jsonl and .parquet hold one document per row.


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise SaeError(
                f"--dataset {path}: unsupported file type {path.suffix!r}; "
                f"use {', '.join(LOCAL_SUFFIXES)} files or a folder of them"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise SaeError(f"--dataset {path}: the folder holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


class LocalFilesSource:
    """Text from local .txt / .jsonl / .parquet files (or a folder of them, in sorted path order)."""

    def __init__(self, path: str | Path, text_column: str = "text") -> None:
        self.path = Path(path)
        self.name = str(path)
        self.text_column = text_column
        self.files = _local_files(self.path)

    def _rows_in(self, file: Path) -> int:
        """Number of documents a file holds, read cheaply (parquet footer, line count)."""
        if file.suffix == ".txt":
            return 1
        if file.suffix == ".parquet":
            return _parquet(file).metadata.num_rows
        with file.open("rb") as handle:
            return sum(1 for line in handle if line.strip())

    def documents(self, start: int = 0) -> Iterator[tuple[int, str]]:
        base = 0
        for file in self.files:
            rows = self._rows_in(file)
            if base + rows <= start:
                base += rows
                continue
            skip = max(0, start - base)
            for row, text in enumerate(self._texts(file), start=0):
                if row >= skip and text:
                    yield base + row, text
            base += rows

    def _texts(self, file: Path) -> Iterator[str]:
        if file.suffix == ".txt":
            yield file.read_text(encoding="utf-8", errors="replace")
        elif file.suffix == ".parquet":
            yield from self._parquet_texts(file)
        else:
            yield from self._jsonl_texts(file)

    def _parquet_texts(self, file: Path) -> Iterator[str]:
        import pyarrow

        parquet = _parquet(file)
        names = parquet.schema_arrow.names
        if self.text_column not in names:
            raise SaeError(
                f"{file}: no column {self.text_column!r} (columns: {', '.join(names)}); "
                "pass the right one with --text-column"
            )
        try:
            for batch in parquet.iter_batches(columns=[self.text_column], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield value if isinstance(value, str) else ""
        except pyarrow.ArrowException as err:
            raise SaeError(f"{file}: a damaged parquet file ({err})") from None

    def _jsonl_texts(self, file: Path) -> Iterator[str]:
        with file.open("rb") as handle:
            line_no = 0
            for raw in handle:
                line_no += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise SaeError(
                        f"{file} line {line_no}: not UTF-8 text; JSON lines must be UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SaeError(f"{file} line {line_no}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or self.text_column not in row:
                    fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise SaeError(
                        f"{file} line {line_no}: no field {self.text_column!r} (has: {fields}); "
                        "pass the right one with --text-column"
                    )
                value = row[self.text_column]
                yield value if isinstance(value, str) else ""


def _parquet(file: Path):
    """The file as a pyarrow ParquetFile; SaeError when it is not one."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except (pyarrow.ArrowException, OSError) as err:
        raise SaeError(f"{file}: not a readable parquet file ({err})") from None


# --------------------------------------------------------------------------------------------
# Hugging Face datasets, streamed (the default: FineWeb).


class HubSource:
    """A `datasets` dataset streamed from the hub; restarting at document n re-reads n documents."""

    def __init__(self, name: str, config: str | None, split: str, text_column: str) -> None:
        self.name = name
        self.config = config
        self.split = split
        self.text_column = text_column

    def _open(self):
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency
            raise SaeError("the `datasets` package is needed to stream a hub dataset") from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # datasets raises many types for "not there / offline"
            lines = str(err).strip().splitlines()
            first = lines[0].rstrip(".") if lines else type(err).__name__
            raise SaeError(
                f"cannot open dataset {self.name!r} (config {self.config!r}, split {self.split!r}): "
                f"{first}. Offline? Use --dataset python-docs or a local file/folder."
            ) from None

    def documents(self, start: int = 0) -> Iterator[tuple[int, str]]:
        stream = self._open()
        if start:
            stream = stream.skip(start)
        index = start
        try:
            for row in stream:
                if self.text_column not in row:
                    raise SaeError(
                        f"dataset {self.name!r} has no column {self.text_column!r} "
                        f"(columns: {', '.join(row)}); pass the right one with --text-column"
                    )
                value = row[self.text_column]
                if isinstance(value, str) and value:
                    yield index, value
                index += 1
        except SaeError:
            raise
        except Exception as err:
            raise SaeError(
                f"reading dataset {self.name!r} failed at document {index}: {err}"
            ) from None


def open_source(dataset: str, config: str | None, split: str, text_column: str) -> TextSource:
    """Pick the source: an existing local path, the built-in ``python-docs``, else a hub dataset."""
    if dataset == PYTHON_DOCS:
        return PythonDocsSource()
    path = Path(dataset).expanduser()
    if path.exists():
        return LocalFilesSource(path, text_column)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(LOCAL_SUFFIXES):
        raise SaeError(f"--dataset {dataset}: no such file or folder")
    return HubSource(dataset, config, split, text_column)
