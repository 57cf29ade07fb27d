"""The embedding stage of a build on a Ray cluster (`koclip index build --engine ray`).

The local engine (koclip.index.pipeline) reads images on threads and runs the model in the
calling process.  This one hands both to Ray Data, so that every node of a cluster works:

    file list --from_items--> read, hash, decode, preprocess   (Ray tasks, _read_batch)
              --map_batches--> embed                           (a pool of model actors, _EmbedActor)
              --iter_batches--> this process: the build's journal

Everything after the journal (duplicates, the index files, the commit) is the build's own
code, so a Ray build writes exactly the index a local build writes.  Results stream back to
the process that started the build, which alone writes: nodes need no shared disk for the
index, only the images (each node reads them by the same absolute path, as Ray Data's own
file readers do).  Fault tolerance is Ray's: a read task whose worker dies is retried, and an
embedding actor that dies is restarted and its batches run again; the journal keeps one
record per file, so nothing is duplicated, and a build interrupted altogether resumes from
the journal like a local one.

`ray` is an optional dependency (`pip install koclip[ray]`); importing this module does not
need it, running a build does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from koclip.errors import ImageError, KoclipError
from koclip.images import open_image, preprocess
from koclip.index.format import _normalise_rows, _Records
from koclip.index.journal import _Journal

log = logging.getLogger(__name__)

# Ray's logical CPUs per model actor and per read task.  XLA uses every core of its node
# whatever Ray counts; these fractions only make room for the read tasks beside the actors,
# so that a node running an actor can still decode images (actors holding every CPU would
# starve the tasks that feed them).
ACTOR_CPUS = 0.75
READ_CPUS = 0.25
CONNECT_SECONDS = 10.0


class RayEngineError(KoclipError):
    """A build on Ray that cannot start or finish (no ray, no cluster, a model the workers cannot load)."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the part of ray this engine uses
    except ImportError as e:
        raise RayEngineError(f"--engine ray needs Ray Data ({e}); install it with `pip install koclip[ray]` "
                             "(or `pip install 'ray[data]'`)") from None
    return ray


def model_spec(embedder) -> dict:
    """What a worker needs to load the same model as `embedder`: {"name": ..., **koclip.load options}.

    Only embedders made by `koclip.load_embedder` (or the CLI's --model) carry one."""
    spec = getattr(embedder, "load_spec", None)
    if not spec:
        raise RayEngineError(
            f"embedder {getattr(embedder, 'name', embedder)!r} cannot be rebuilt on Ray workers: build it with "
            "koclip.load_embedder(name) so that each worker loads the model by that name")
    return dict(spec)


def _read_batch(batch: dict, *, image_spec, known: frozenset) -> dict:
    """One Ray task: read, hash, decode and preprocess a batch of files.

    In: {"key": stored paths, "file": absolute paths}.  Out: one row per file with its
    record, `error` ("" when it decoded; else why not), `dup` (its sha256 was in `known`) and
    `pixels` (zeros for rows that are not embedded).
    """
    keys, files = list(batch["key"]), list(batch["file"])
    n = len(keys)
    size, width, height = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    sha, error, dup = [""] * n, [""] * n, np.zeros(n, bool)
    images, where = [], []
    for i, (key, file) in enumerate(zip(keys, files)):
        try:
            data = Path(file).read_bytes()
        except OSError as e:
            error[i] = f"cannot read file: {e.strerror or e}"
            continue
        size[i], sha[i] = len(data), hashlib.sha256(data).hexdigest()
        if sha[i] in known:
            dup[i] = True
            continue
        try:
            image = open_image(data, name=key)
        except ImageError as e:
            error[i] = str(e)
            continue
        width[i], height[i] = image.width, image.height
        images.append(image)
        where.append(i)
    shape = (image_spec.size, image_spec.size, 3)
    pixels = np.zeros((n, *shape), np.float32)
    if images:
        pixels[where] = preprocess(images, image_spec)
    return {"key": np.array(keys, dtype=object), "size": size, "sha256": np.array(sha, dtype=object),
            "width": width, "height": height, "error": np.array(error, dtype=object), "dup": dup,
            "pixels": pixels}


class _EmbedActor:
    """A model on a Ray worker: pixels in, vectors out (rows with an error or a duplicate get zeros)."""

    def __init__(self, spec: dict, fingerprint: str):
        from koclip.embedder import load_embedder  # the library's model, loaded in the worker

        spec = dict(spec)
        self.embedder = load_embedder(spec.pop("name"), **spec)
        if self.embedder.fingerprint != fingerprint:
            raise RayEngineError(
                f"the model loaded on Ray node {os.uname().nodename} (pid {os.getpid()}) has fingerprint "
                f"{self.embedder.fingerprint[:12]}, not {fingerprint[:12]} as where the build started: the "
                "nodes see different weights or koclip versions")

    def __call__(self, batch: dict) -> dict:
        pixels = batch.pop("pixels")
        keep = np.flatnonzero((batch["error"] == "") & ~batch["dup"])
        vectors = np.zeros((len(pixels), self.embedder.dim), np.float32)
        if len(keep):
            t = time.perf_counter()
            vectors[keep] = self.embedder.encode_pixels(pixels[keep])
            batch["model_seconds"] = np.full(len(pixels), (time.perf_counter() - t) / len(pixels))
        else:
            batch["model_seconds"] = np.zeros(len(pixels))
        batch["vector"] = vectors
        return batch


def cluster_cpus(ray) -> float:
    """Logical CPUs of the connected cluster's alive nodes."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def embed_files(embedder, files: list[tuple[str, Path]], journal: _Journal, *, batch_size: int,
                address: str | None, actors: int | None, progress: bool, checkpoint_every: int,
                done: set[str], known: frozenset | set = frozenset(),
                on_batch: Callable[[int, int], None] | None = None) -> tuple[int, float, float]:
    """Embed the `files` ((stored path, absolute path) pairs) not in `done` into `journal` on Ray.

    Same contract as koclip.index.pipeline._embed_files: returns (images embedded, model
    seconds per actor, seconds of the whole stage), and commits to the journal every
    `checkpoint_every` images or 30 s and when stopped.  Model seconds are per actor (the
    actors' summed time in the model over their number), so that model / stage seconds
    (BuildReport.model_busy) is the mean actor's busy fraction, sum / (wall x actors), not a
    sum of actors that run at once, which reads over 100% with several.
    address: the cluster to join ("auto", "HOST:PORT"; None: $RAY_ADDRESS, else a local
        Ray started for this build).
    actors: model actors (default: one per ACTOR_CPUS + READ_CPUS of the cluster's CPUs, at
        least 1, at most one per batch).
    on_batch(done, total): called after each batch reaches the journal (progress display).
    """
    todo = [(k, str(f)) for k, f in files if k not in done]
    t_start = time.monotonic()
    if not todo:
        return 0, 0.0, 0.0
    spec = model_spec(embedder)
    image_spec = embedder.processor.image_spec
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayEngineError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'!r}: {e}") \
                from None
    # koclip draws its own progress bar; Ray Data's would interleave with it on the terminal.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ray_data_log = logging.getLogger("ray.data")
    old_level = ray_data_log.level
    ray_data_log.setLevel(logging.WARNING)
    try:
        n_batches = -(-len(todo) // batch_size)
        pool = actors or max(1, int(cluster_cpus(ray) // (ACTOR_CPUS + READ_CPUS)))
        pool = max(1, min(pool, n_batches))
        log.info("embedding %d images on Ray: %d actors, cluster CPUs %g", len(todo), pool, cluster_cpus(ray))
        ds = ray.data.from_items([{"key": k, "file": f} for k, f in todo], override_num_blocks=n_batches)
        ds = ds.map_batches(_read_batch, batch_size=batch_size, batch_format="numpy", num_cpus=READ_CPUS,
                            fn_kwargs={"image_spec": image_spec, "known": frozenset(known)})
        ds = ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="numpy", num_cpus=ACTOR_CPUS,
                            compute=ray.data.ActorPoolStrategy(size=pool),
                            fn_constructor_kwargs={"spec": spec, "fingerprint": embedder.fingerprint})
        return _collect(ds, journal, embedder, total=len(files), already=len(files) - len(todo),
                        progress=progress, checkpoint_every=checkpoint_every, on_batch=on_batch,
                        t_start=t_start, actors=pool)
    except KoclipError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps a worker's error in its own types
        cause = _koclip_cause(e)
        if cause is not None:
            raise cause from None
        raise RayEngineError(f"the Ray build stopped: {type(e).__name__}: {e}") from e
    finally:
        ray_data_log.setLevel(old_level)
        if started_here:
            ray.shutdown()


def _check_reachable(address: str | None, timeout: float = CONNECT_SECONDS) -> None:
    """Fails within `timeout` seconds when `address` ("HOST:PORT") takes no connection: ray.init
    itself keeps retrying an absent cluster for minutes."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayEngineError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayEngineError(f"no Ray cluster answers at {address!r} ({e.strerror or e}); start one with "
                             f"`ray start --head`, or give the address `ray start` printed") from None


def _koclip_cause(e: BaseException) -> KoclipError | None:
    """The KoclipError a Ray worker raised, when `e` (Ray's wrapper) carries one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KoclipError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _collect(ds, journal: _Journal, embedder, *, total: int, already: int, progress: bool,
             checkpoint_every: int, on_batch, t_start: float, actors: int) -> tuple[int, float, float]:
    """Streams the dataset's rows into the journal, once per file; returns (images embedded,
    model seconds per actor: the batches' model seconds summed over the `actors`' number,
    seconds since `t_start`)."""
    bar = tqdm(total=total, initial=already, unit="img", desc="embedding (ray)", disable=not progress,
               smoothing=0.05, dynamic_ncols=True)
    records, vectors, failed, dups = _Records(), [], [], []
    seen: set[str] = set()
    embedded, model_s, count, last_commit = 0, 0.0, already, time.monotonic()

    def commit():
        nonlocal records, vectors, failed, dups, last_commit
        journal.commit(records, vectors, failed, dups)
        records, vectors, failed, dups = _Records(), [], [], []
        last_commit = time.monotonic()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = [i for i, k in enumerate(batch["key"]) if k not in seen]  # a retried batch counts once
            ok = []
            for i in rows:
                key = str(batch["key"][i])
                seen.add(key)
                if batch["error"][i]:
                    failed.append((key, str(batch["error"][i])))
                elif batch["dup"][i]:
                    dups.append((key, str(batch["sha256"][i])))
                else:
                    records.add(key, int(batch["size"][i]), str(batch["sha256"][i]), int(batch["width"][i]),
                                int(batch["height"][i]))
                    ok.append(i)
            if ok:
                z = np.asarray(batch["vector"][ok], np.float32)
                vectors.append(_normalise_rows(z, f"embedding of {str(batch['key'][ok[0]])!r} and batch"))
                embedded += len(ok)
            model_s += float(np.sum(batch["model_seconds"][rows])) if rows else 0.0
            count += len(rows)
            bar.update(len(rows))
            if len(records) + len(failed) + len(dups) >= checkpoint_every or time.monotonic() - last_commit > 30:
                commit()
            if on_batch is not None:
                on_batch(count, total)
    finally:
        commit()  # what finished is kept, even when stopping on an error
        bar.close()
    seconds = time.monotonic() - t_start
    log.info("the %d model actors spent %.1f actor-seconds in the model in %.1f s", actors, model_s, seconds)
    return embedded, model_s / actors, seconds
