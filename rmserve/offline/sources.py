"""Input files of the offline job, read as a stream of raw rows.

A raw row is what the file holds for one row before any checking: a line (bytes) for jsonl
(parsed later, so a malformed line becomes that row's error, not a crash) or a dict for parquet
and `datasets` rows. Row numbers count the rows the file holds from 0 (blank jsonl lines are
not rows).

| kind      | how it is named                                     | fingerprint                   |
|-----------|-----------------------------------------------------|-------------------------------|
| jsonl     | `*.jsonl`, `*.json`, `*.ndjson`                     | blake2b of the file's bytes   |
| jsonl.gz  | the same with `.gz`                                 | blake2b of the compressed bytes |
| parquet   | `*.parquet` (a file)                                | blake2b of the file's bytes   |
| datasets  | a directory written by `Dataset.save_to_disk`, or `hf:<name>` / `hf:<name>:<split>` on the hub | blake2b of the directory's data files / the hub dataset's own fingerprint |
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

PARQUET_BATCH = 4096
NEEDS_DATASETS = "reading a Hugging Face dataset needs the `datasets` package: pip install 'rmserve[datasets]'"
HUB_TIMEOUT_S = 10.0   # hf:<name>: the one metadata request that checks the hub can be reached


class SourceError(ValueError):
    """The input cannot be read at all (not a per-row problem)."""


def _hash_file(path: str, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


class _Hashing(io.RawIOBase):
    """A binary file that feeds every byte read through a hash."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.h.update(memoryview(b)[:n])
        return n


def _row_lines(f) -> Iterator[bytes]:
    """The non-blank lines of a binary jsonl stream, without a UTF-8 byte-order mark at its start
    (Windows tools write one); CRLF line ends are left to json.loads, which accepts them."""
    first = True
    for line in f:
        if first:
            first = False
            if line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
        if line.strip():
            yield line


@dataclass(frozen=True)
class Source:
    """One input: its kind, where it is, and (for the hub) which split."""
    kind: str        # jsonl | jsonl.gz | parquet | datasets-dir | datasets-hub
    path: str
    split: str | None = None

    # ---- one pass over the whole input: rows and fingerprint ----
    def scan(self) -> tuple[int, str]:
        """(number of rows, fingerprint). Reads the input once; memory stays bounded."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.kind.encode())
        if self.kind in ("jsonl", "jsonl.gz"):   # one pass: hash the file's bytes as the lines are counted
            with open(self.path, "rb") as raw:
                stream = io.BufferedReader(_Hashing(raw, h), 1 << 20)
                f = gzip.GzipFile(fileobj=stream) if self.kind == "jsonl.gz" else stream
                try:
                    rows = sum(1 for _ in _row_lines(f))
                except (EOFError, OSError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
                    raise SourceError(f"{self.path}: cannot read it as {self.kind} ({e}); is the file "
                                      "truncated or not gzip-compressed?") from None
                stream.read()   # whatever gzip left unread counts too
            return rows, h.hexdigest()
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            _hash_file(self.path, h)
            try:
                return pq.ParquetFile(self.path).metadata.num_rows, h.hexdigest()
            except pa.ArrowException as e:
                raise SourceError(f"{self.path}: not a readable parquet file ({e})") from None
        if self.kind == "datasets-dir":
            for root, dirs, files in sorted(os.walk(self.path)):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    h.update(os.path.relpath(full, self.path).encode())
                    _hash_file(full, h)
            return len(self._dataset()), h.hexdigest()
        ds = self._dataset()
        h.update(f"{self.path}:{self.split}:{ds._fingerprint}".encode())
        return len(ds), h.hexdigest()

    def rows(self) -> Iterator[Any]:
        """Every raw row in order."""
        if self.kind in ("jsonl", "jsonl.gz"):
            yield from self._lines()
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=PARQUET_BATCH):
                yield from batch.to_pylist()
        else:
            ds = self._dataset()
            for start in range(0, len(ds), PARQUET_BATCH):
                yield from ds.select(range(start, min(start + PARQUET_BATCH, len(ds)))).to_list()

    def _lines(self) -> Iterator[bytes]:
        """Non-blank lines as bytes (decoded per row, so bad UTF-8 is that row's error)."""
        with (gzip.open(self.path, "rb") if self.kind == "jsonl.gz" else open(self.path, "rb")) as f:
            yield from _row_lines(f)

    def _dataset(self):
        try:
            import datasets
        except ImportError as e:
            raise SourceError(NEEDS_DATASETS) from e
        if self.kind == "datasets-dir":
            ds = datasets.load_from_disk(self.path)
            if isinstance(ds, datasets.DatasetDict):
                if self.split is None:
                    raise SourceError(f"{self.path} holds splits {sorted(ds)}; pass --split")
                if self.split not in ds:
                    raise SourceError(f"{self.path} has no split {self.split!r}; its splits are {sorted(ds)}")
                ds = ds[self.split]
            elif self.split is not None:   # one Dataset: the split would be ignored, the whole input scored
                raise SourceError(f"--split {self.split}: {self.path} holds one dataset, with no splits")
            return ds
        try:
            return datasets.load_dataset(self.path, split=self.split or "train")
        except (OSError, ValueError, KeyError) as e:   # offline or unreachable (ConnectionError), no such dataset, no such split
            raise SourceError(f"hf:{self.path}: cannot load it from the hub ({type(e).__name__}: {e})") from None


def reach_hub(name: str) -> None:
    """Refuses at once, with the reason, a hub dataset when the hub cannot be reached: `datasets`
    itself retries for about 26 s first. One metadata request (HUB_TIMEOUT_S), repeated once after a
    second; any HTTP answer (found, not found, gated) means the hub is there, and `datasets` then
    says what is wrong. Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) asks nothing: `datasets`
    loads its cached copy."""
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HfHubHTTPError

    if constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
        return
    for attempt in range(2):
        try:
            HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
            return
        except HfHubHTTPError:
            return
        except Exception as e:   # no answer at all: a DNS failure, a refused connection, a timeout
            error = e
        if attempt == 0:
            time.sleep(1.0)
    raise SourceError(f"hf:{name}: cannot reach the hub at {constants.ENDPOINT} ({type(error).__name__}: {error}); "
                      "check the network, or set HF_HUB_OFFLINE=1 to load a copy cached earlier")


def open_source(spec: str, split: str | None = None) -> Source:
    """A path or `hf:<name>[:<split>]` -> Source. Raises SourceError for what cannot be read."""
    if spec.startswith("hf:"):
        name, _, hub_split = spec[3:].partition(":")
        if split and hub_split and split != hub_split:
            raise SourceError(f"{spec} and --split {split} name two splits; give one")
        try:
            reach_hub(name)
        except ImportError as e:
            raise SourceError(NEEDS_DATASETS) from e
        return Source("datasets-hub", name, split or hub_split or None)
    if os.path.isdir(spec):
        if not (os.path.exists(os.path.join(spec, "dataset_info.json"))
                or os.path.exists(os.path.join(spec, "dataset_dict.json"))):
            raise SourceError(f"{spec} is a directory but not a dataset saved with save_to_disk")
        return Source("datasets-dir", spec, split)
    if not os.path.exists(spec):
        raise SourceError(f"{spec}: no such file (for a hub dataset write hf:<name>[:<split>])")
    if split is not None:   # a file is one table: the split would be ignored, the whole input scored
        raise SourceError(f"--split {split}: {spec} is a file, with no splits")
    name = spec.lower()
    if name.endswith(".parquet"):
        return Source("parquet", spec)
    for ext in (".jsonl", ".json", ".ndjson"):
        if name.endswith(ext + ".gz"):
            return Source("jsonl.gz", spec)
        if name.endswith(ext):
            return Source("jsonl", spec)
    raise SourceError(f"{spec}: unknown input type; expected .jsonl, .jsonl.gz, .parquet, a datasets "
                      "directory, or hf:<name>")
