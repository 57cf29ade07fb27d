"""Damaged and mismatched checkpoints fail with a CheckpointError that says what is wrong, and
hub ids resolve through huggingface_hub's cache or fail fast offline.

Each test damages a copy of a committed fixture from tests/fixtures/parity
(written by scripts/make_parity_fixtures.py).
"""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest

import koclip
from koclip.errors import CheckpointError, KoclipError, OfflineError, UnknownModelError
from koclip.formats import safetensors_io


def truncate(path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def edit_config(directory, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_truncated_msgpack_is_reported_as_truncated(parity_copy):
    d = parity_copy("hybrid_clip_clip")
    truncate(d / "flax_model.msgpack")
    with pytest.raises(CheckpointError, match=r"flax_model\.msgpack.*truncated"):
        koclip.load(str(d))


def test_truncated_safetensors_is_reported_as_truncated(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    truncate(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        koclip.load(str(d))


def test_truncated_pytorch_bin_is_a_checkpoint_error(parity_copy):
    d = parity_copy("dual_clip_bin")
    truncate(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*truncated"):
        koclip.load(str(d))


def test_msgpack_shape_mismatch_names_file_tensor_and_both_shapes(parity_copy):
    d = parity_copy("hybrid_clip_clip")
    edit_config(d, lambda c: c["text_config"].update(vocab_size=98))
    with pytest.raises(CheckpointError) as e:
        koclip.load(str(d))
    msg = str(e.value)
    assert "flax_model.msgpack" in msg
    assert "text_model.embeddings.word_embeddings.embedding" in msg
    assert "(99, 32)" in msg and "(98, 32)" in msg


def test_safetensors_shape_mismatch_names_tensor_and_both_shapes(parity_copy):
    d = parity_copy("dual_vit_safetensors")
    edit_config(d, lambda c: c["vision_config"].update(intermediate_size=40))
    with pytest.raises(CheckpointError) as e:
        koclip.load(str(d))
    msg = str(e.value)
    assert "model.safetensors" in msg and "vision_model.encoder.layer.0.intermediate.dense." in msg
    # The bias or the kernel, whichever the file holds first; the kernel in Flax layout (in, out).
    assert ("(37,)" in msg and "(40,)" in msg) or ("(32, 37)" in msg and "(32, 40)" in msg)


def test_missing_config_json_is_named(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*missing"):
        koclip.load(str(d))


def test_corrupt_config_json_is_a_checkpoint_error(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    (d / "config.json").write_text('{"model_type": "vision-text-dual-encoder", ')
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        koclip.load(str(d))


def test_unknown_model_type_lists_the_valid_ones(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    edit_config(d, lambda c: c.update(model_type="clip-but-different"))
    with pytest.raises(CheckpointError) as e:
        koclip.load(str(d))
    msg = str(e.value)
    assert msg.startswith(f"{d / 'config.json'}: ") and "clip-but-different" in msg
    for valid in ("hybrid-clip", "vision-text-dual-encoder", "koclip"):
        assert valid in msg


def test_config_json_value_the_config_refuses_is_a_checkpoint_error_naming_the_file(parity_copy):
    # koclip.config raises ConfigError; read from a checkpoint, the same value is the file's fault.
    d = parity_copy("dual_clip_safetensors")
    edit_config(d, lambda c: c["text_config"].update(num_attention_heads=5))
    with pytest.raises(CheckpointError, match=re.escape(f"{d / 'config.json'}: text hidden_size 32 is not "
                                                        "divisible by num_attention_heads 5")):
        koclip.load(str(d))


def test_unknown_registry_name_lists_the_valid_names():
    with pytest.raises(UnknownModelError) as e:
        koclip.load("nope")
    assert isinstance(e.value, KoclipError)
    for name in koclip.available_models():
        assert name in str(e.value)


def test_missing_tensor_is_named(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    path = d / "model.safetensors"
    tensors = [(n, x) for n, x in safetensors_io.iter_tensors(path) if n != "text_model.pooler.dense.weight"]
    safetensors_io.write(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*text_model\.pooler\.dense\.kernel"):
        koclip.load(str(d))


def test_unexpected_tensor_is_named(parity_copy):
    d = parity_copy("dual_clip_safetensors")
    path = d / "model.safetensors"
    tensors = list(safetensors_io.iter_tensors(path)) + [("text_model.extra_head.weight", np.zeros((2, 2), np.float32))]
    safetensors_io.write(path, tensors)
    with pytest.raises(CheckpointError, match=r"extra_head"):
        koclip.load(str(d))


def test_hub_id_loads_from_the_cache_when_offline(hf_cache, parity_fixture, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    snapshot = hf_cache.put("owner/tiny-koclip", parity_fixture("hybrid_clip_clip"))
    model, processor = koclip.load("owner/tiny-koclip")
    assert model.load_info.path == str(snapshot)
    with np.load(snapshot / "golden.npz") as g:
        assert np.abs(np.asarray(model.encode_image(g["pixel_values"])) - g["image_embeds"]).max() <= 1e-4
        batch = processor(text=[str(t) for t in g["texts"]])
        assert np.abs(np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))
                      - g["text_embeds"]).max() <= 1e-4


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uncached_hub_id_with_unreachable_hub_raises_offline_error_quickly(hf_cache, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    import huggingface_hub as hf

    asked = []  # local_files_only of each snapshot_download: a download would retry for ~20 s
    real = hf.snapshot_download
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **kw: asked.append(kw.get("local_files_only"))
                        or real(*a, **kw))
    with pytest.raises(OfflineError) as e:
        koclip.load("owner/not-cached")
    assert asked == [True], asked  # quickly: the probe found no hub, so only the cache was asked
    assert "owner/not-cached" in str(e.value)
    assert re.search(r"koclip-mini", str(e.value))


def test_save_refuses_a_quantised_model(tmp_path):
    from flax import nnx

    from koclip.config import TINY
    from koclip.quantize import quantize

    model = quantize(koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)), "bf16")
    with pytest.raises(CheckpointError, match="bf16"):
        koclip.save(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_sigmoid_model_with_a_headless_tower_saves_and_loads_with_its_bias(tmp_path):
    from flax import nnx
    from tiny_tokenizer import write_tiny_tokenizer

    from koclip.config import TINY
    from koclip.formats.convert import flat_params

    cfg = TINY.replace(projection_dim=TINY.vision.hidden_size, vision_head="none", text_head="affine",
                       scoring="sigmoid")
    model = koclip.KoCLIP(cfg, rngs=nnx.Rngs(0))
    model.logit_bias[...] = np.float32(-3.5)
    koclip.save(model, tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m")
    back, _ = koclip.load(str(tmp_path / "m"))
    assert back.visual_projection is None and back.config.scoring == "sigmoid"
    want, got = flat_params(model), flat_params(back)
    assert set(want) == set(got) and "logit_bias" in got
    assert all(np.array_equal(np.asarray(want[k]), np.asarray(got[k])) for k in want)


@pytest.mark.parametrize("preset, fixture", [("msiglip-base", "siglip_spiece"), ("siglip2-base", "siglip2_gemma"),
                                             ("clip-b32", "clip")])
def test_registry_preset_loads_its_checkpoint_layout_from_the_hub_cache(preset, fixture, hf_cache, parity_fixture,
                                                                        monkeypatch):
    # The tiny fixture stands in for the preset's repository: the same files, under the preset's hub id.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    snapshot = hf_cache.put(koclip.registry.get(preset).source, parity_fixture(fixture))
    model, processor = koclip.load(preset)
    assert model.load_info.name == preset and model.load_info.path == str(snapshot)
    with np.load(snapshot / "golden.npz") as g:
        batch = processor(text=[str(t) for t in g["texts"]])
        logits = model(batch["input_ids"], batch["attention_mask"], g["pixel_values"])
        assert np.abs(np.asarray(logits) - g["logits_per_image"]).max() <= 1e-4 * max(1.0, np.abs(
            g["logits_per_image"]).max())
    assert model.scoring == ("softmax" if preset == "clip-b32" else "sigmoid")


# ---------------------------------------------------------------- memory: one tensor at a time

@pytest.mark.parametrize("sides", [{"name": "clip_legacy"}, {"name": "siglip_spiece"},
                                   {"text": "mclip", "vision": "clip"}],
                         ids=["clip-bin", "siglip-safetensors", "mclip-bin+clip-safetensors"])
def test_loading_passes_each_tensor_on_before_reading_the_next(sides, parity_fixture, monkeypatch):
    # What keeps loading memory near the checkpoint's size: every tensor that reaches the model is
    # (a view of) the one read last, so the reader is never ahead with the rest of the file in memory.
    from koclip import loading
    from koclip.formats import checkpoints

    last, passed = [], []
    real_read, real_assign = checkpoints.read_tensors, loading.assign

    def reading(path):
        items, torch_layout = real_read(path)

        def recorded():
            for name, x in items:
                last[:] = [name, x]
                yield name, x

        return recorded(), torch_layout

    def assigning(model, items, source, **kw):
        def checked():
            for name, x in items:
                assert np.shares_memory(x, last[1]), f"{name} is passed on after {last[0]} was read"
                passed.append(name)
                yield name, x

        return real_assign(model, checked(), source, **kw)

    monkeypatch.setattr(checkpoints, "read_tensors", reading)
    monkeypatch.setattr(loading, "assign", assigning)
    koclip.load(**{side: str(parity_fixture(d)) for side, d in sides.items()})
    assert len(passed) > 20


def test_assign_finishes_each_copy_before_taking_the_next_array():
    # jax copies a host array asynchronously and lets it go only after the copy (at its next call);
    # assign waits on each copy, so of the arrays it has taken only the last two can still be alive.
    import weakref

    import jax
    from flax import nnx

    from koclip.formats.convert import assign

    class Stack(nnx.Module):
        def __init__(self, n, size):
            self.ws = nnx.List([nnx.Param(jax.numpy.zeros(size)) for _ in range(n)])

    n, size = 12, 4_000_000  # 16 MB each: copies long enough to be still running without the wait
    model = nnx.eval_shape(lambda: Stack(n, size))
    taken = []

    def arrays():
        for i in range(n):
            earlier = [j for j, ref in enumerate(taken[:-2]) if ref() is not None]
            assert not earlier, f"arrays {earlier} are still held when array {i} is taken"
            buf = np.empty(4 * size + 4, np.uint8)  # 4 bytes in: unaligned, so jax copies rather than aliases
            taken.append(weakref.ref(buf))
            yield f"ws.{i}", buf[4:].view(np.float32)
            del buf

    assign(model, arrays(), "test")
    assert np.asarray(model.ws[n - 1][...]).shape == (size,)
