"""`koclip index build --engine ray` on a real two-node Ray cluster on 127.0.0.1.

The cluster is two raylets started with `ray start` (a head and a node that joins it), one CPU
each, as two machines would run them; the build connects to it by address.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import koclip
from koclip.config import TINY
from koclip.index import build_index, load_index
from koclip.index.ray_engine import RayEngineError
from tiny_tokenizer import write_tiny_tokenizer

ray = pytest.importorskip("ray", reason="ray is in requirements-dev.txt; `pip install koclip[ray]`")

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
N_IMAGES = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every process of the test cluster, this one included, runs without Ray's token authentication
# (said explicitly: Ray 2.60 turns it on for a head that finds ~/.ray/auth_token, but not for a
# node joining it unless RAY_AUTH_MODE says so).
AUTH = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_cli(*args, timeout=180):
    env = {**os.environ, **AUTH}
    done = subprocess.run([*RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def cluster():
    """HOST:PORT of a two-node cluster: `ray start --head` plus a second `ray start --address`."""
    # A short temp dir: Ray's socket paths must fit in 107 bytes.
    temp = tempfile.mkdtemp(prefix="kray", dir="/tmp")
    address = f"127.0.0.1:{_free_port()}"
    saved = {k: os.environ.get(k) for k in AUTH}
    os.environ.update(AUTH)
    common = ("--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats")
    try:
        _ray_cli("start", "--head", "--port", address.split(":")[1], "--temp-dir", temp,
                 "--include-dashboard", "false", *common)
        _ray_cli("start", "--address", address, *common)
        yield address
    finally:
        subprocess.run([*RAY, "stop", "--force"], capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ray_model")
    koclip.save(koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)), directory)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N_IMAGES small photos, one unreadable file and one byte-for-byte duplicate."""
    d = tmp_path_factory.mktemp("ray_photos")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        sub = d / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(sub / f"p{i:02d}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "copy.png").write_bytes((d / "a" / "p01.png").read_bytes())
    return d


@pytest.fixture(scope="module")
def local(model_dir, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "photos.kidx"
    report = build_index(koclip.load_embedder(str(model_dir)), photos, out, batch_size=4, progress=False)
    return report, load_index(out)


def _same_index(got, want):
    assert got.paths == want.paths
    a, b = np.asarray(got.vectors, np.float32), np.asarray(want.vectors, np.float32)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 1 - 1e-3


def test_a_ray_build_on_two_nodes_writes_the_local_engines_index(cluster, model_dir, photos, local, tmp_path):
    nodes = [n for n in _nodes(cluster) if n["Alive"]]
    assert len(nodes) == 2
    out = tmp_path / "photos.kidx"
    report = build_index(koclip.load_embedder(str(model_dir)), photos, out, batch_size=4, progress=False,
                         engine="ray", ray_address=cluster)
    want_report, want = local
    _same_index(load_index(out), want)
    assert report.count == want.count == N_IMAGES
    assert report.skipped == want_report.skipped and [p for p, _ in report.skipped] == ["broken.jpg"]
    assert report.duplicates == want_report.duplicates
    assert not out.with_name(out.name + ".partial").exists()


def test_an_embedding_worker_killed_mid_build_is_retried_and_nothing_is_lost_or_doubled(
        cluster, model_dir, photos, local, tmp_path):
    killed = []

    def kill_one_actor(done, total):
        if killed:
            return
        actors = _actor_processes()
        assert actors, "no embedding actor alive while batches remain"
        os.kill(actors[0], signal.SIGKILL)
        killed.append((done, total, actors[0]))

    out = tmp_path / "photos.kidx"
    report = build_index(koclip.load_embedder(str(model_dir)), photos, out, batch_size=2, progress=False,
                         engine="ray", ray_address=cluster, on_batch=kill_one_actor)
    assert killed and killed[0][0] < killed[0][1]  # killed with work left
    _same_index(load_index(out), local[1])
    assert report.count == N_IMAGES and len(set(load_index(out).paths)) == N_IMAGES


def test_an_embedder_without_a_load_spec_is_refused_before_ray_starts(model_dir, photos, tmp_path):
    model, processor = koclip.load(str(model_dir))
    with pytest.raises(RayEngineError, match="koclip.load_embedder"):
        build_index(koclip.Embedder(model, processor), photos, tmp_path / "x.kidx", engine="ray",
                    ray_address="127.0.0.1:1", progress=False)


def test_an_unreachable_cluster_is_named(model_dir, photos, tmp_path):
    with pytest.raises(RayEngineError, match="127.0.0.1:1"):
        build_index(koclip.load_embedder(str(model_dir)), photos, tmp_path / "x.kidx", engine="ray",
                    ray_address="127.0.0.1:1", progress=False)


def test_the_model_seconds_of_a_ray_build_are_per_actor(tmp_path):
    # Two actors at once, 0.75 s in the model for each of 4 images: 3 actor-seconds, 1.5 s per actor,
    # so that BuildReport.model_busy is sum / (wall x actors), never above 1 as a plain sum would be.
    from koclip.index.journal import _Journal
    from koclip.index.ray_engine import _collect

    def batch(keys):
        n = len(keys)
        return {"key": np.array(keys, dtype=object), "size": np.ones(n, np.int64),
                "sha256": np.array([f"{i:064x}" for i in range(n)], dtype=object), "width": np.ones(n, np.int32),
                "height": np.ones(n, np.int32), "error": np.array([""] * n, dtype=object),
                "dup": np.zeros(n, bool), "vector": np.ones((n, 4), np.float32),
                "model_seconds": np.full(n, 0.75)}

    class Batches:  # what Ray Data's dataset yields, without Ray
        def iter_batches(self, **kw):
            return iter([batch(["a.png", "b.png"]), batch(["c.png", "d.png"])])

    journal = _Journal(tmp_path / "x.kidx.partial", {"model": "m", "fingerprint": "f" * 64,
                                                      "images_root": str(tmp_path), "shard": None})
    embedded, model_seconds, _ = _collect(Batches(), journal, None, total=4, already=0, progress=False,
                                          checkpoint_every=100, on_batch=None, t_start=0.0, actors=2)
    assert (embedded, model_seconds) == (4, 1.5)


def test_the_cli_says_a_ray_builds_busy_share_is_per_actor(capsys):
    from koclip.index import BuildReport
    from koclip.index.cli import _print_report

    _print_report(BuildReport(Path("x.kidx"), embedded=4, model_seconds=1.5, pipeline_seconds=2.0), ray=True)
    assert "the model actors were busy 75% of the time each, on average" in capsys.readouterr().out


def _actor_processes() -> list[int]:
    """PIDs of the processes running koclip's embedding actors (Ray titles them
    `ray::MapWorker(MapBatches(_EmbedActor))`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # gone meanwhile, or not a process
            continue
        if proc.name.isdigit() and title.startswith(b"ray::") and b"_EmbedActor" in title:
            pids.append(int(proc.name))
    return sorted(pids)


def _nodes(address):
    """The cluster's nodes as ray.nodes() lists them, from a short-lived driver."""
    code = f"import ray, json; ray.init(address={address!r}); print(json.dumps(ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])
