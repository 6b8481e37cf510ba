"""Read raw rows from local files, the hub or the synthetic generator, through `datasets`.

Each file is loaded on its own so that every error names the file, and every row keeps its file
and 1-based row number for later messages. `load_train_rows`/`load_files` give plain Python dicts
(the in-memory reference path); `rows_dataset` gives the same rows as an Arrow-backed `datasets`
dataset, or a streamed one, for preparing corpora of any size (prepare.py).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from launcher.data.synthetic import generate
from launcher.errors import DataError
from launcher.recipe.sections import DataConfig

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".arrow": "arrow"}
"""File extension -> `datasets` builder."""


@dataclass(frozen=True, slots=True)
class Row:
    """One raw row and where it came from, so errors can name it."""

    source: str
    """The file path, `data.hub` id or `data.synthetic`."""

    number: int
    """1-based row number within its source."""

    data: Any


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars: loading a few local files is instant and the bars clutter run logs."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _locate_bad_json(path: Path, skip: bool) -> tuple[list[tuple[int, Any]], int]:
    """Re-read a file `datasets` could not parse with the json module, to name the bad row.

    Returns (row number, row) pairs. With `skip`, a `.jsonl` file's unparsable lines are dropped
    and counted instead; the other rows keep their numbers.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}): fix the "
                "file (a .json file holds one array of rows; use .jsonl for one row per line)"
            ) from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold an array of rows, [{{...}}, ...]")
        return list(enumerate(data, start=1)), 0
    rows, skipped, number = [], 0, 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            if not skip:
                raise DataError(
                    f"{path}: row {number} (line {line_no}) is not valid JSON ({e.msg}): fix or "
                    "remove the line, or set data.skip_malformed=true to skip such rows"
                ) from None
            skipped += 1
    return rows, skipped


def _load_file(path: Path, key: str, data: DataConfig) -> tuple[list[Row], int]:
    builder = BUILDERS[path.suffix.lower()]
    # data.sample_by: what a document of a .txt file is (by default its paragraphs, blank-line
    # separated: speeches in a play, sections of a book). Each gets its own eos and positions.
    kwargs = {"sample_by": data.sample_by} if builder == "text" else {}
    skipped = 0
    try:
        # A throwaway cache: the rows are read into memory at once, and the default cache under
        # ~/.cache would keep an Arrow copy of every file ever loaded.
        with _quiet(), tempfile.TemporaryDirectory(prefix="launcher-data-") as cache:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", keep_in_memory=True,
                cache_dir=cache, **kwargs,
            )  # fmt: skip
            records = list(enumerate(ds.to_list(), start=1))
    except Exception as e:  # datasets wraps parser errors in several exception types
        if builder != "json":
            raise DataError(f"{key}: cannot read {path}: {str(e).splitlines()[0]}") from None
        records, skipped = _locate_bad_json(path, data.skip_malformed)
    if builder == "text":
        records = [(n, r) for n, r in records if r["text"].strip()]
    if not records and not skipped:
        raise DataError(f"{key}: {path} holds no rows: check the file, or remove it from {key}")
    return [Row(str(path), n, r) for n, r in records], skipped


def _check_path(raw: str, key: str, data: DataConfig) -> Path:
    path = Path(raw).expanduser()
    if not path.exists():
        raise DataError(
            f"{key}: {raw} not found (resolved to {path.absolute()}): fix the path; relative paths "
            f"are resolved against the directory the command runs in ({Path.cwd()})"
        )
    if path.is_dir():
        raise DataError(f"{key}: {raw} is a directory: list the data files in it instead")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"{key}: {raw} has an unsupported extension {suffix or '(none)'!r}: use one of "
            f"{', '.join(BUILDERS)}"
        )
    if suffix == ".txt" and data.format != "text":
        raise DataError(
            f"{key}: {raw} is raw text, which only data.format=text reads (format is "
            f"{data.format}): use .json/.jsonl/.parquet rows, or set data.format=text"
        )
    return path


def load_files(paths: list[str], key: str, data: DataConfig) -> tuple[list[Row], int]:
    """Rows of every file in `paths` (recipe key `key`), and the number of unparsable rows
    skipped."""
    rows: list[Row] = []
    skipped = 0
    for path in [_check_path(p, key, data) for p in paths]:  # check all paths before reading any
        file_rows, file_skipped = _load_file(path, key, data)
        rows += file_rows
        skipped += file_skipped
    return rows, skipped


def open_hub(data: DataConfig, key: str = "data.hub") -> Any:
    """The hub dataset (a `datasets.IterableDataset` with `data.streaming`)."""
    try:
        with _quiet():
            return datasets.load_dataset(data.hub, data.hub_config, split=data.hub_split,
                                         revision=data.hub_revision, streaming=data.streaming)
    except Exception as e:
        raise DataError(
            f"{key}: cannot load {data.hub!r} split {data.hub_split!r} "
            f"({str(e).splitlines()[0]}): check the id, config and split, and that the hub is reachable"
        ) from None


def load_hub(data: DataConfig) -> list[Row]:
    ds = open_hub(data)
    rows = ds.to_list() if isinstance(ds, datasets.Dataset) else list(ds)
    return [Row(f"hub:{data.hub}", i, r) for i, r in enumerate(rows, start=1)]


def load_synthetic(data: DataConfig) -> list[Row]:
    assert data.synthetic is not None
    ds = datasets.Dataset.from_list(generate(data.synthetic))
    return [Row("data.synthetic", i, r) for i, r in enumerate(ds.to_list(), start=1)]


def load_train_rows(data: DataConfig) -> tuple[list[Row], int]:
    """The rows of the recipe's training source, and how many unparsable rows were skipped."""
    if data.synthetic is not None:
        return load_synthetic(data), 0
    if data.hub:
        return load_hub(data), 0
    return load_files(data.path, "data.path", data)


def _numbered(ds: Any, src: int, numbers: list[int] | None = None) -> Any:
    """`ds` with the columns `_src` (index into the source names) and `_row` (1-based number)."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(lambda r, i: {"_src": src, "_row": i + 1}, with_indices=True)
    n = len(ds)
    ds = ds.add_column("_row", numbers or list(range(1, n + 1)))
    return ds.add_column("_src", [src] * n)


def _file_dataset(path: Path, src: int, key: str, data: DataConfig, cache: str) -> tuple[Any, int]:
    """One file as an Arrow dataset (on disk under `cache`, memory-mapped), numbered."""
    builder = BUILDERS[path.suffix.lower()]
    kwargs = {"sample_by": data.sample_by} if builder == "text" else {}
    try:
        with _quiet():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **kwargs)
    except Exception as e:
        if builder != "json":
            raise DataError(f"{key}: cannot read {path}: {str(e).splitlines()[0]}") from None
        records, skipped = _locate_bad_json(path, data.skip_malformed)
        if not records and not skipped:
            raise DataError(f"{key}: {path} holds no rows: check the file, or remove it from {key}")
        # rows as JSON text: rows of a broken file need not share one Arrow schema
        raw = datasets.Dataset.from_dict({"_raw": [json.dumps(r) for _, r in records]})
        return _numbered(raw, src, [n for n, _ in records]), skipped
    ds = _numbered(ds, src)
    if builder == "text":
        with _quiet():
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"{key}: {path} holds no rows: check the file, or remove it from {key}")
    return ds, 0


def rows_dataset(data: DataConfig, key: str, cache: str) -> tuple[Any, list[str], int]:
    """The rows of `data`'s one source as a `datasets` dataset (an IterableDataset when
    streaming) with `_src`/`_row` columns naming each row's origin; the source names `_src`
    indexes; and the number of unparsable rows skipped. Files are read into Arrow files under
    `cache`, never into Python lists."""
    if data.synthetic is not None:
        return _numbered(datasets.Dataset.from_list(generate(data.synthetic)), 0), ["data.synthetic"], 0
    if data.hub:
        return _numbered(open_hub(data, key), 0), [f"hub:{data.hub}"], 0
    paths = [_check_path(p, key, data) for p in data.path]
    parts, skipped = [], 0
    for i, path in enumerate(paths):
        ds, n = _file_dataset(path, i, key, data, cache)
        parts.append(ds)
        skipped += n
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:  # different columns or types
        raise DataError(
            f"{key}: the files do not share one set of columns ({str(e).splitlines()[0]}): give "
            "files of the same shape, or list them as separate data.sources"
        ) from None
    return ds, [str(p) for p in paths], skipped
