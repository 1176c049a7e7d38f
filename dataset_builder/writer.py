"""The Hub-ready M3Dsynth folder: Parquet shards, the manifest that makes a build resumable, the
dataset card.

Layout (other code depends on it)::

    <out>/README.md                                    dataset card, YAML `configs:` ("all" the default)
    <out>/data/<generator>/<task>/<split>-<rank:05d>-<shard:05d>.parquet
    <out>/manifest.json                                per shard: rows, bytes, sha256, img_ids

Scans are grouped, split by split, into chunks of ``scans_per_shard`` consecutive scans; chunk ``i`` of
a split is shard ``i`` of every ``<generator>/<task>`` folder it has rows for, written by process
``rank``. The chunks are dealt in consecutive runs, the first run to process 0: shards are the same files
on any number of processes, only named by another rank, and sorted by name they keep the order of the
chunks, so the dataset reads its rows in the same order (the order of a resume with another number of
processes may differ). Each shard is written under a temporary name
and renamed when complete, under ``.build/`` (``.build/data/...``), where `datasets` does not look: an
unfinished build cannot be loaded as if it were complete. After each chunk the process records its shards
(with SHA-256) in its own journal ``.build/rank-<rank>.json``. A restarted build skips the chunks whose
shards are recorded and intact, and redoes the others, so a killed build loses no sample and duplicates
none; `finalize` moves the shards to ``data/``, merges the journals into ``manifest.json``, removes stray
files and writes the card. While a build runs, its main process holds ``<out>/.m3d-build.lock``
(`build_lock`): a second build into the same folder at the same time is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..constants import GENERATORS, SPLITS, TASKS
from ..files import write_json_atomic
from .features import FEATURES
from .generate import Outcome, ScanJob

MANIFEST = "manifest.json"
JOURNALS = ".build"
LOCK = ".m3d-build.lock"
FORMAT_VERSION = 1

ExamplesFn = Callable[[ScanJob], Iterator[tuple[dict[str, Any] | None, Outcome]]]


def shard_path(generator: str, task: str, split: str, rank: int, shard: int) -> str:
    """The folder-relative path of a shard."""
    return f"data/{generator}/{task}/{split}-{rank:05d}-{shard:05d}.parquet"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over a saved model folder's files (relative names and contents; the model card left out):
    what a build records of each pipeline, so that a resume with other weights is refused."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


@dataclass
class Chunk:
    """Consecutive scans of one split that go into shard ``index`` of that split."""

    split: str
    index: int
    jobs: list[ScanJob]

    @property
    def key(self) -> str:
        return f"{self.split}/{self.index:05d}"


def make_chunks(jobs: Sequence[ScanJob], scans_per_shard: int) -> list[Chunk]:
    """Chunks in split order (train, validation, test), scans in job order within a split."""
    if scans_per_shard < 1:
        raise ValueError(f"scans_per_shard must be positive; got {scans_per_shard}")
    chunks = []
    for split in SPLITS:
        in_split = [job for job in jobs if job.split == split]
        for index, start in enumerate(range(0, len(in_split), scans_per_shard)):
            chunks.append(Chunk(split, index, in_split[start : start + scans_per_shard]))
    unknown = {job.split for job in jobs} - set(SPLITS)
    if unknown:
        raise ValueError(f"scans with unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    return chunks


class _ShardWriter:
    """Streams examples into one Parquet file per (generator, task), one row group per example."""

    def __init__(self, root: Path, split: str, rank: int, shard: int):
        self.root, self.split, self.rank, self.shard = root, split, rank, shard
        self.writers: dict[tuple[str, str], tuple[pq.ParquetWriter, Path]] = {}
        self.img_ids: dict[tuple[str, str], list[str]] = {}

    def add(self, example: dict[str, Any]) -> None:
        key = (example["generator"], example["task"])
        if key not in self.writers:
            final = self.root / shard_path(*key, self.split, self.rank, self.shard)
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            self.writers[key] = (pq.ParquetWriter(temporary, FEATURES.arrow_schema), temporary)
            self.img_ids[key] = []
        table = pa.Table.from_pylist([FEATURES.encode_example(example)], schema=FEATURES.arrow_schema)
        self.writers[key][0].write_table(table)
        self.img_ids[key].append(example["img_id"])

    def close(self) -> dict[str, dict[str, Any]]:
        """Close and rename every shard; returns the manifest entries."""
        entries = {}
        for key, (writer, temporary) in sorted(self.writers.items()):
            writer.close()
            relative = shard_path(*key, self.split, self.rank, self.shard)
            temporary.replace(self.root / relative)
            entries[relative] = {
                "rows": len(self.img_ids[key]),
                "bytes": (self.root / relative).stat().st_size,
                "sha256": sha256_file(self.root / relative),
                "img_ids": self.img_ids[key],
            }
        return entries

    def abort(self) -> None:
        for writer, temporary in self.writers.values():
            writer.close()
            temporary.unlink(missing_ok=True)


@dataclass
class BuildState:
    """The merged record of a folder: build options, finished chunks, shards."""

    config: dict[str, Any] | None = None
    chunks: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def merge(self, record: dict[str, Any], source: str) -> None:
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
            raise ValueError(f"{source}: not an m3d dataset manifest of format {FORMAT_VERSION}")
        if self.config is None:
            self.config = record["config"]
        elif record["config"] != self.config:
            raise ValueError(f"{source} records other build options than the rest of the folder")
        self.chunks.update(record["chunks"])
        self.shards.update(record["shards"])

    def record(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "config": self.config, "chunks": self.chunks, "shards": self.shards}


def read_state(out: Path) -> BuildState:
    """The manifest merged with every process's journal."""
    state = BuildState()
    for path in [out / MANIFEST, *sorted((out / JOURNALS).glob("rank-*.json"))]:
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{path} is not valid JSON ({error}); restore it, or pass --overwrite to rebuild"
                ) from None
            state.merge(record, str(path))
    return state


def _shard_file(out: Path, relative: str) -> Path:
    """Where a shard is: in place after `finalize`, staged under ``.build/`` before."""
    final = out / relative
    return final if final.is_file() else out / JOURNALS / relative


def _intact(out: Path, state: BuildState, chunk: dict[str, Any]) -> bool:
    for relative in chunk["shards"]:
        entry, path = state.shards.get(relative), _shard_file(out, relative)
        if (
            entry is None
            or not path.is_file()
            or path.stat().st_size != entry["bytes"]
            or sha256_file(path) != entry["sha256"]
        ):
            return False
    return True


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s build lock for the block (an exclusive lock on `LOCK`, released by the system if the
    process dies); raise `BlockingIOError` at once if another build holds it."""
    path = out / LOCK
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BlockingIOError(
                f"{out} is being written by another build (process {holder}): wait for it to end, or "
                "choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _holds_files(out: Path) -> bool:
    return out.exists() and any(path.name != LOCK for path in out.iterdir())


def prepare_folder(out: str | Path, config: dict[str, Any], *, overwrite: bool = False) -> BuildState:
    """Check ``out`` (new, or an m3d dataset folder built with the same ``config``) and return its state."""
    out = Path(out)
    if overwrite and out.exists():
        if not (out / MANIFEST).is_file() and not (out / JOURNALS).is_dir() and _holds_files(out):
            raise FileExistsError(f"{out} is not an m3d dataset folder (no {MANIFEST}): refusing to overwrite it")
        for name in ("data", JOURNALS, MANIFEST, "README.md"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if _holds_files(out) and not ((out / MANIFEST).is_file() or (out / JOURNALS).is_dir()):
        raise FileExistsError(f"{out} exists and is not an m3d dataset folder: choose another --out")
    state = read_state(out)
    if state.config is not None and state.config != config:
        changed = sorted(k for k in set(config) | set(state.config) if config.get(k) != state.config.get(k))
        raise ValueError(
            f"{out} was built with other options ({', '.join(changed)} differ): resume with the same options, "
            f"or pass --overwrite / another --out"
        )
    state.config = config
    return state


def write_shards(
    out: str | Path,
    jobs: Sequence[ScanJob],
    examples: ExamplesFn,
    config: dict[str, Any],
    *,
    scans_per_shard: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    state: BuildState | None = None,
) -> list[Outcome]:
    """Write this process's chunks (``rank`` of ``world_size``) not already done; returns the outcomes
    of the samples made (``config`` must already be checked with `prepare_folder`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    state = read_state(out) if state is None else state
    journal_path = out / JOURNALS / f"rank-{rank:05d}.json"
    journal = BuildState(config=config)
    if journal_path.is_file():
        journal.merge(json.loads(journal_path.read_text()), str(journal_path))
    chunks = make_chunks(jobs, scans_per_shard)
    mine = chunks[rank * len(chunks) // world_size : (rank + 1) * len(chunks) // world_size]
    todo = [c for c in mine if c.key not in state.chunks or not _intact(out, state, state.chunks[c.key])]
    outcomes: list[Outcome] = []
    (out / JOURNALS).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(c.jobs) for c in todo), desc=f"build [{rank}]", unit="scan", disable=not progress)
    for chunk in todo:
        writer = _ShardWriter(out / JOURNALS, chunk.split, rank, chunk.index)  # staged until finalize
        started, chunk_outcomes = time.perf_counter(), []
        try:
            for job in chunk.jobs:
                for example, outcome in examples(job):
                    if example is not None:
                        writer.add(example)
                    chunk_outcomes.append(outcome)
                bar.update()
        except BaseException:
            writer.abort()
            raise
        shards = writer.close()
        journal.shards.update(shards)
        journal.chunks[chunk.key] = {
            "rank": rank,
            "series": [job.series_instance_uid for job in chunk.jobs],
            "shards": sorted(shards),
            "outcomes": Counter(f"{o.generator}/{o.task}/{o.status}" for o in chunk_outcomes),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(journal_path, journal.record(), indent=1, trailing_newline=True)
        outcomes += chunk_outcomes
    bar.close()
    return outcomes


def finalize(out: str | Path, *, pretty_name: str = "M3Dsynth") -> BuildState:
    """Move the staged shards into ``data/``, merge the journals into ``manifest.json``, delete shards no
    chunk records (left by a kill), and write the dataset card. Run once, by one process, after every
    process has written its shards."""
    from .card import write_dataset_card

    out = Path(out)
    state = read_state(out)
    recorded = {relative for chunk in state.chunks.values() for relative in chunk["shards"]}
    state.shards = {relative: entry for relative, entry in state.shards.items() if relative in recorded}
    for relative in sorted(recorded):
        staged = out / JOURNALS / relative
        if staged.is_file():
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            staged.replace(out / relative)
    for path in sorted((out / "data").rglob("*")) if (out / "data").is_dir() else []:
        if path.is_file() and path.relative_to(out).as_posix() not in recorded:
            path.unlink()
    write_json_atomic(out / MANIFEST, state.record(), indent=1, trailing_newline=True)
    shutil.rmtree(out / JOURNALS, ignore_errors=True)
    write_dataset_card(out, state, pretty_name=pretty_name)
    return state


def summarize(state: BuildState) -> list[dict[str, Any]]:
    """Per generator and task: samples kept, dropped by the quality check, skipped, rows per split, MB."""
    outcomes: Counter = Counter()
    for chunk in state.chunks.values():
        outcomes.update(chunk["outcomes"])
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for generator in GENERATORS:
        for task in TASKS:
            row = {"generator": generator, "task": task, **{s: 0 for s in SPLITS}, "MB": 0.0}
            for status in ("kept", "dropped", "skipped"):
                row[status] = outcomes.get(f"{generator}/{task}/{status}", 0)
            rows[generator, task] = row
    for relative, entry in state.shards.items():
        _, generator, task, name = relative.split("/")
        rows[generator, task][name.split("-")[0]] += entry["rows"]
        rows[generator, task]["MB"] += entry["bytes"] / 1e6
    return [row for row in rows.values() if row["kept"] or row["dropped"] or row["skipped"] or row["MB"]]


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table."""
    header = ["generator", "task", "kept", "dropped", "skipped", *SPLITS, "MB"]
    lines = [f"{header[0]:<10} {header[1]:<7} " + " ".join(f"{h:>10}" for h in header[2:])]
    for row in rows:
        cells = [f"{row[h]:>10}" for h in header[2:-1]] + [f"{row['MB']:>10.1f}"]
        lines.append(f"{row['generator']:<10} {row['task']:<7} " + " ".join(cells))
    return "\n".join(lines)
