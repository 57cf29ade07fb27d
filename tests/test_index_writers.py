"""Two writers on one index: each holds the writer lock from reading the index to committing it,
so neither undoes the other; a writer that cannot get the lock in time says who holds it."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from koclip.errors import IndexFileError
from koclip.index import build_index, load_index, remove_images
from koclip.index.format import _writer_lock
from koclip.index.ops import _write_index
from test_index import TinyEmbedder, make_photos, noise

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _python(code: str, tmp_path: Path, name: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_holder(lock_file: Path, pid: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if json.loads(lock_file.read_text() or "{}").get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"the {what} process ended before taking the lock: {proc.communicate()}"
        assert time.monotonic() < deadline, f"the {what} process did not take the lock within 60 s"
        time.sleep(0.02)


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "photos"
    make_photos(root)
    out = tmp_path / "p.kidx"
    build_index(TinyEmbedder(), root, out, progress=False)
    new = root / "new"
    new.mkdir()
    for i in range(3):
        noise(200 + i).save(new / f"new{i}.png")
    return root, out


def test_add_and_remove_in_two_processes_both_take_effect(gallery, tmp_path):
    root, out = gallery
    before = load_index(out)
    # The add takes the lock, then its model waits for a gate file; the remove is started while the
    # add holds the lock, and the gate opens only once the remove has said it is waiting.  So the
    # remove must wait for the add's commit and then remove from the index the add wrote.
    gate = tmp_path / "gate"
    adder = _python(f"""
        import time
        from pathlib import Path
        from test_index import TinyEmbedder
        from koclip.index import add_images

        class Gated(TinyEmbedder):
            def encode_pixels(self, pixels):
                deadline = time.monotonic() + 120
                while not Path({str(gate)!r}).exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the gate never opened")
                    time.sleep(0.02)
                return super().encode_pixels(pixels)

        add_images({str(out)!r}, Gated(), {str(root / "new")!r}, batch_size=1, progress=False)
    """, tmp_path, "add")
    remover = None
    try:
        _wait_for_holder(out / ".lock", adder.pid, adder, "add")
        remover = _python(f"""
            from koclip.index import remove_images
            print(remove_images({str(out)!r}, ["grey.bmp"], lock_wait=600).count)  # ample on a loaded machine
        """, tmp_path, "remove")
        said = []
        while not said or "waiting up to" not in said[-1]:  # bounded: the remover gives up after 600 s
            line = remover.stderr.readline()
            assert line, f"the remover ended without waiting: {''.join(said)}"
            said.append(line)
        assert f"process {adder.pid}" in said[-1]
        gate.touch()
        add_out, add_err = adder.communicate(timeout=120)
        remove_out, remove_err = remover.communicate(timeout=120)
    finally:
        for p in (adder, remover):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert adder.returncode == 0, add_err[-3000:]
    assert remover.returncode == 0, remove_err[-3000:]
    after = load_index(out)
    expected = sorted(set(before.paths) - {"grey.bmp"} | {f"new/new{i}.png" for i in range(3)})
    assert sorted(after.paths) == expected
    assert int(remove_out.strip()) == after.count == before.count + 3 - 1
    # Rows that both writers kept still hold their own vectors.
    row = {p: i for i, p in enumerate(before.paths)}
    kept = [p for p in after.paths if p in row]
    np.testing.assert_array_equal(after.vectors[[after.paths.index(p) for p in kept]],
                                  before.vectors[[row[p] for p in kept]])


def test_a_writer_that_cannot_get_the_lock_in_time_names_the_holder_and_changes_nothing(gallery, tmp_path):
    _, out = gallery
    holder = _python(f"""
        import time
        from pathlib import Path
        from koclip.index.format import _writer_lock
        with _writer_lock(Path({str(out)!r}), "adding images"):
            print("held", flush=True)
            time.sleep(120)
    """, tmp_path, "hold")
    try:
        _wait_for_holder(out / ".lock", holder.pid, holder, "holding")
        meta = (out / "meta.json").read_bytes()
        with pytest.raises(IndexFileError, match=rf"in use by process {holder.pid} \(adding images, since "
                                                 r"[0-9:]+\); waited 0.2 s"):
            remove_images(out, ["grey.bmp"], lock_wait=0.2)
        assert (out / "meta.json").read_bytes() == meta
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), its lock is released and the same call succeeds.
    assert remove_images(out, ["grey.bmp"], lock_wait=0).paths == ["grey.bmp"]


def test_writing_without_the_lock_is_a_programming_error(gallery):
    _, out = gallery
    index = load_index(out)
    with pytest.raises(RuntimeError, match="without the index's writer lock"):
        _write_index(out, model=index.model, fingerprint=index.fingerprint, dim=index.dim,
                     dtype=index.dtype, images_root=str(index.root), blocks=[])


def test_the_lock_is_reentrant_in_one_thread(gallery):
    _, out = gallery
    with _writer_lock(out, "outer", wait=0):
        assert remove_images(out, ["grey.bmp"], lock_wait=0).count == load_index(out).count
