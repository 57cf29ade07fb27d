"""koclip train on several hosts, tested as it runs: two `koclip train` processes on 127.0.0.1.

Each process gets its own workdir, as hosts without a shared disk would.  The
runs are LiT (features=image): the frozen image tower's features are computed
once into the feature cache, the text tower trains.  Subprocesses share the
JAX compilation cache in pytest's cache folder with tests/test_train.py.
"""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from numerics import assert_trees_close, reduction_rtol
from test_train import data, make_data, read_metrics, run_env  # noqa: F401 (data, run_env: module fixtures, one per module)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds for any one run (a cold compilation cache on two busy cores takes ~4 min)
LOST_PEER_LIMIT = 120  # seconds from killing process 1 until process 0 has exited

# 32 training examples, global batch 16 (8 per device, two devices either way): 2 steps per epoch.
STEPS = 12
SETS = {"synthetic_examples": 0, "num_epochs": STEPS // 2, "eval_batch_size": 8, "progress": "false",
        "checkpoint_every_steps": 6, "log_every_steps": 1, "features": "image"}

# fp32 rounding allowed between 1 process x 2 devices and 2 processes x 1 device, relative to
# the loss.  TINY's longest reduction here is a text-tower weight gradient over the global batch:
# 16 captions x 16 tokens (the image tower's patch convolution sums 8 * 8 * 3 = 192).  One step
# (forward and backward through the text tower's embeddings and two layers, pooling, both
# projections and the loss) chains fewer than the 40 reductions tests/test_train.py counts for
# both towers; computing the cached image features, fewer than 20 (FEATURE_RTOL).  The loss of
# step k comes from parameters that k - 1 earlier steps produced: at learning rate 1e-3 each step
# moves a weight by at most about the learning rate (Adam's normalised update, gradients
# clipped), so a rounding difference made in one step is carried into the later ones, not
# amplified, and to first order the relative differences of the chained steps add: step k's
# loss is within depth 40 * (k + 1) reductions (k steps, and the features counted as one more).
# TINY's embeddings start nearly alike, so over these steps its loss stays within 1e-3 of
# log 16: the comparison catches a batch that is not one global batch (log 8 = 2.08), and the
# feature cache test below catches rows out of place.
def loss_rtol(step: int) -> float:
    return reduction_rtol(16 * 16, depth=40 * (step + 1))


# The cached image features are one forward pass of the image tower: its longest reduction is the
# patch convolution (8 * 8 * 3 terms), and patch embedding, two layers (attention scores, softmax,
# weighted sum, output projection, MLP, two layer norms each) and the pooling chain fewer than 20.
FEATURE_RTOL = reduction_rtol(8 * 8 * 3, depth=20)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data, workdir, **sets):
    args = [sys.executable, "-m", "koclip.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
            "--workdir", str(workdir)]
    for k, v in {"train_data": data["train"], "val_data": data["val"], "tokenizer": data["tokenizer"],
                 **SETS, **sets}.items():
        args += ["--set", f"{k}={v}"]
    return args


class Hosts:
    """`n` koclip train processes, process i in workdir root/w{i}, its stderr in root/err{i}."""

    def __init__(self, root: Path, data, env, n: int = 2, **sets):
        self.root, self.procs, self.files, self.errors = root, [], [], []
        port = free_port()
        try:
            for i in range(n):
                host_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
                                JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
                self.files.append(open(root / f"err{i}", "w"))
                self.procs.append(subprocess.Popen(train_args(data, self.workdir(i), **sets), env=host_env,
                                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.files[-1]))
        except BaseException:
            self.close()
            raise

    def workdir(self, i: int) -> Path:
        return self.root / f"w{i}"

    def stderr(self, i: int) -> str:
        return self.errors[i] if self.errors else (self.root / f"err{i}").read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in self.files:
            f.close()
        # Kept: a restart in the same folder writes the files again.
        self.errors = [(self.root / f"err{i}").read_text(errors="replace") for i in range(len(self.procs))]


def run_hosts(root: Path, data, env, **sets) -> Hosts:
    root.mkdir(parents=True, exist_ok=True)
    hosts = Hosts(root, data, env, **sets)
    try:
        codes = hosts.wait()
    finally:
        hosts.close()
    for i, rc in enumerate(codes):
        assert rc == 0, f"process {i} exited {rc}:\n{hosts.stderr(i)[-3000:]}"
    return hosts


def losses(workdir) -> dict[int, float]:
    """Training loss by step (a step logged twice, before and after a restart: the later row)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, run_env):
    """One process with two (fake) devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(train_args(data, workdir), env=env, capture_output=True, text=True, timeout=TIMEOUT,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, data, run_env):
    """Two processes with one device each, each with its own workdir."""
    return run_hosts(tmp_path_factory.mktemp("two_processes"), data, run_env)


def test_two_processes_give_the_losses_of_one_process_with_two_devices(reference, two_hosts):
    one, two = losses(reference), losses(two_hosts.workdir(0))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=loss_rtol(step)), f"step {step}"
    summary = json.loads((two_hosts.workdir(0) / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["global_batch"] == 16 and summary["steps"] == STEPS


def test_two_processes_compute_the_feature_cache_of_one_process(reference, two_hosts):
    files = files_under(reference / "features")
    assert files_under(two_hosts.workdir(0) / "features") == files
    for name in files:
        with np.load(reference / "features" / name) as a, np.load(two_hosts.workdir(0) / "features" / name) as b:
            np.testing.assert_array_equal(a["ok"], b["ok"])
            assert_trees_close([a["feats"]], [b["feats"]], FEATURE_RTOL, f"{name} features")


def test_only_process_0_writes_checkpoints_feature_cache_and_model(two_hosts):
    lead = two_hosts.workdir(0)
    assert sorted(p.name for p in (lead / "checkpoints").iterdir()) == ["12", "6"]
    # Image features of the training and of the validation images.
    assert [f.split("-")[0] for f in files_under(lead / "features")] == ["image", "image"]
    assert (lead / "model" / "model.safetensors").is_file() and (lead / "summary.json").is_file()
    assert files_under(two_hosts.workdir(1)) == []


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data, run_env):
    """Two processes checkpointing every 2 steps; process 1 is killed once process 0 has saved one."""
    root = tmp_path_factory.mktemp("killed")
    sets = {"checkpoint_every_steps": 2}
    hosts = Hosts(root, data, run_env, **sets)
    try:
        checkpoints = hosts.workdir(0) / "checkpoints"
        deadline = time.monotonic() + TIMEOUT
        while not any(p.name.isdigit() for p in checkpoints.glob("*")):
            assert all(p.poll() is None for p in hosts.procs), "a process ended before the first checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT} s"
            time.sleep(0.02)
        hosts.procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            rc = hosts.procs[0].wait(timeout=LOST_PEER_LIMIT)
        except subprocess.TimeoutExpired:
            rc = None
        waited = time.monotonic() - t_kill
    finally:
        hosts.close()
    return {"root": root, "hosts": hosts, "sets": sets, "rc": rc, "waited": waited}


@pytest.mark.slow  # two runs of two processes
def test_killing_one_process_stops_the_other_with_a_clear_error(killed):
    hosts = killed["hosts"]
    assert killed["rc"] is not None, f"process 0 still ran {LOST_PEER_LIMIT} s after process 1 was killed"
    assert not (hosts.workdir(0) / "summary.json").exists(), "the run finished before process 1 was killed"
    err = hosts.stderr(0)
    assert killed["rc"] == 2, f"process 0 exited {killed['rc']} after {killed['waited']:.0f} s:\n{err[-3000:]}"
    assert re.search(r"training process 1 of 2 stopped responding \(.+\); the run stopped after step \d+; "
                     r"restart all processes to resume from the last checkpoint \(step \d+ in \S+checkpoints "
                     r"on process 0's host\)", err), err[-3000:]


@pytest.mark.slow
def test_restarting_both_resumes_from_process_0s_checkpoint(killed, two_hosts, data, run_env):
    root = killed["root"]
    # Process 1's workdir is still empty: its state comes from process 0's checkpoint.
    assert files_under(root / "w1") == []
    run_hosts(root, data, run_env, **killed["sets"])
    summary = json.loads((root / "w0" / "summary.json").read_text())
    assert summary["resumed_from"] > 0 and summary["steps"] == STEPS
    # The same programs on the same numbers as the uninterrupted two-process run.
    resumed, whole = losses(root / "w0"), losses(two_hosts.workdir(0))
    assert sorted(resumed) == sorted(whole)
    assert [resumed[s] for s in whole] == pytest.approx([whole[s] for s in whole], abs=1e-6)
    assert files_under(root / "w1") == []
