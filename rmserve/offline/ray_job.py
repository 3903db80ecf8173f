"""The offline job on a Ray cluster, through Ray Data.

    rmserve score data.parquet --model M --output /shared/scores.parquet --ray [ADDRESS]
    run_ray_job(JobConfig(...), address="auto", actors=8)

The driver reads the input once (fingerprint, rows), cuts it into the same fixed parts as the
single-process job and stages each uncommitted part's raw rows under `<output>.parts/`; then a
Ray Data pipeline over the part numbers runs
    tokenize (CPU tasks) -> map_batches(engine actor, one per GPU; on CPU `actors` actors) ,
where each actor writes its part's files itself (atomically, named by the part number) and the
driver commits each part in the manifest as its result arrives. A rerun skips committed parts
exactly as the single-process job does. The output directory must be on storage every node sees.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Callable, TextIO

from .job import JobConfig, announce, finish, model_path, part_rows, prepare, progress
from .parts import PartStore, atomic_write
from .scoring import Encoding, build_outputs, encode_rows, score_samples
from .shapes import ShapeConfig, make_row

TOKENIZE_CPUS = 0.5    # a tokenize task is light; leave CPUs to the engine actors
RAY_LOG = "ray.log"    # in OUTPUT.parts/: what Ray prints while the job runs


@functools.lru_cache(maxsize=4)
def _preprocessor(model: str, engine_settings: tuple):
    """The same Preprocessor an Engine on this checkpoint would build (cached per worker process)."""
    from ..config import load_spec
    from ..engine import EngineConfig, load_tokenizer, make_preprocessor

    model_dir = model_path(model)   # resolved on this node (a hub id downloads here)
    return make_preprocessor(load_spec(model_dir), load_tokenizer(model_dir), EngineConfig(**dict(engine_settings)))


def _tokenize(batch: dict, *, model: str, engine_settings: tuple, shape: ShapeConfig, parts_dir: str) -> dict:
    pre = _preprocessor(model, engine_settings)
    blobs = []
    for k in batch["part"]:
        with open(os.path.join(parts_dir, f"input-{int(k):06d}.pkl"), "rb") as f:
            first, raws = pickle.load(f)
        items = [make_row(shape, first + j, raw) for j, raw in enumerate(raws)]
        blobs.append(pickle.dumps((first, len(raws), encode_rows(pre.encode_many, items))))
    import numpy as np

    return {"part": np.asarray(batch["part"]), "payload": np.array(blobs, dtype=object)}


class _ScoreActor:
    """One engine per actor; scores whole parts and writes their files."""

    def __init__(self, model: str, engine_settings: tuple, shape: ShapeConfig, output: str, fmt: str,
                 threads: int, samples: int, seed: int):
        import torch

        from ..engine import Engine

        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = Engine.from_pretrained(model_path(model), **dict(engine_settings))
        self.shape, self.samples, self.seed = shape, samples, seed
        self.store = PartStore(output, fmt)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        stats = []
        for k, blob in zip(batch["part"], batch["payload"]):
            first, n, enc = pickle.loads(blob)
            enc: Encoding
            results = score_samples(self.engine, enc.encoded, enc.groups, self.samples, self.seed)
            out = build_outputs(self.shape, enc, results, first, n)
            self.store.write_part(int(k), out.records, out.errors)
            stats.append(json.dumps(out.stats))
        return {"part": np.asarray(batch["part"]), "stats": np.array(stats, dtype=object)}


def _output_to(path: str) -> tuple[TextIO, Callable[[], None]]:
    """Sends this process's stdout and stderr to `path` (file descriptors 1 and 2: Ray's C++ core
    worker writes there, besides its Python loggers and the workers' forwarded output), so that none
    of it runs through the progress bar. Returns the stream for the bar (the terminal's stderr; or
    sys.stderr itself where it is not file descriptor 2, a notebook's, say) and the function that
    puts everything back."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        own_stream = sys.stderr.fileno() != 2
    except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation: no file descriptor
        own_stream = True
    saved = (os.dup(1), os.dup(2))
    console = sys.stderr if own_stream else os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)

    def restore() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        if console is not sys.stderr:
            console.close()

    return console, restore


def run_ray_job(config: JobConfig, address: str | None = None, actors: int | None = None,
                actor_cpus: float = 1.0, actor_gpus: float | None = None, init_kwargs: dict | None = None) -> dict:
    """Runs (or resumes) the job on Ray. address: a cluster ("auto", "ray://host:10001"); None joins
    RAY_ADDRESS if set, else starts a local Ray. actors: engine actors (default: one per GPU in
    the cluster, else 1); actor_gpus: GPUs each (default 1 when the cluster has GPUs, else 0)."""
    for name, value, least in (("actors", actors, 1), ("actor_cpus", actor_cpus, 0), ("actor_gpus", actor_gpus, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    import ray

    with prepare(config, "ray") as prep:
        if announce(prep):
            return prep.done
        start, before = time.perf_counter(), prep.store.manifest["seconds"]
        todo = []
        for k, first, raws in part_rows(prep):   # stage the raw rows of every uncommitted part
            path = prep.store.stage_path(k)
            if not os.path.exists(path):
                blob = pickle.dumps((first, raws))
                atomic_write(path, lambda f: f.write(blob))
            todo.append(k)

        console, restore_output = _output_to(os.path.join(prep.store.dir, RAY_LOG))   # Ray's lines, not the bar's
        started_here = not ray.is_initialized()
        try:
            if started_here:
                ray.init(address=address, logging_level="WARNING", **(init_kwargs or {}))
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.execution_options.preserve_order = False
            gpus = ray.cluster_resources().get("GPU", 0)
            actors = actors or max(1, int(gpus))
            actor_gpus = (1.0 if gpus else 0.0) if actor_gpus is None else actor_gpus
            settings = tuple(sorted(asdict(config.engine).items()))
            if actor_gpus == 0 and config.engine.device is None:
                settings = tuple(sorted(asdict(replace(config.engine, device="cpu")).items()))
            common: dict[str, Any] = {"model": config.model, "engine_settings": settings, "shape": prep.shape}
            bar = progress(prep, config.quiet, console)
            tokens = 0
            if todo:
                ds = ray.data.from_items([{"part": k} for k in todo], override_num_blocks=len(todo))
                ds = ds.map_batches(_tokenize, batch_size=1, num_cpus=TOKENIZE_CPUS, batch_format="numpy",
                                    fn_kwargs={**common, "parts_dir": prep.store.dir})
                ds = ds.map_batches(_ScoreActor, batch_size=1, batch_format="numpy",
                                    compute=ray.data.ActorPoolStrategy(size=actors),
                                    num_cpus=actor_cpus, num_gpus=actor_gpus,
                                    fn_constructor_kwargs={**common, "output": config.output, "fmt": prep.store.fmt,
                                                           "threads": max(1, int(actor_cpus)),
                                                           "samples": config.samples, "seed": config.seed})
                for row in ds.iter_rows():
                    k, stats = int(row["part"]), json.loads(row["stats"])
                    prep.store.commit(k, stats, before + time.perf_counter() - start)
                    tokens += stats["tokens"]
                    bar.update(stats["rows"])
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)
            bar.close()
        except BaseException:
            # Nothing committed (an engine actor that could not start, say): leave no manifest or
            # staged rows behind that would refuse the corrected command, as the local job does.
            prep.store.discard_if_empty()
            raise
        finally:
            if started_here:
                ray.shutdown()
            restore_output()
        return finish(prep, before + time.perf_counter() - start)
