"""Retrieval and zero-shot metrics on hand-worked 4x4 examples, and the `koclip eval` commands."""

import gzip
import json
import struct

import numpy as np
import pytest

from koclip.evaluation.metrics import ranks, recall_at_k, retrieval_metrics, topk_accuracy
from koclip.evaluation.zeroshot import ensemble
from numerics import U32, reduction_rtol, unit_norm_atol

# Query i's correct item is item i.
SIM = np.array([
    [0.9, 0.1, 0.3, 0.2],  # correct 0.9 is the best            -> rank 0
    [0.2, 0.1, 0.8, 0.4],  # 0.2, 0.8, 0.4 beat the correct 0.1  -> rank 3
    [0.1, 0.5, 0.6, 0.7],  # 0.7 beats the correct 0.6           -> rank 1
    [0.3, 0.2, 0.1, 0.4],  # correct 0.4 is the best            -> rank 0
])


def test_ranks_count_wrong_items_above_the_correct_one():
    assert ranks(SIM, np.arange(4)).tolist() == [0, 3, 1, 0]


def test_recall_at_k_on_a_4x4_example():
    truth = np.arange(4)
    assert recall_at_k(SIM, truth, 1) == 0.5   # queries 0, 3
    assert recall_at_k(SIM, truth, 2) == 0.75  # + query 2
    assert recall_at_k(SIM, truth, 3) == 0.75
    assert recall_at_k(SIM, truth, 4) == 1.0


def test_ties_count_against_the_model():
    flat = np.ones((4, 4))
    assert recall_at_k(flat, np.arange(4), 1) == 0.0
    assert recall_at_k(flat, np.arange(4), 4) == 1.0


def test_any_correct_item_counts_when_there_are_several():
    # Query 1 has items 1 and 2 correct: item 2 (0.8) is the best of all -> rank 0.
    truth = np.eye(4, dtype=bool)
    truth[1, 2] = True
    assert ranks(SIM, truth).tolist() == [0, 0, 1, 0]
    assert recall_at_k(SIM, truth, 1) == 0.75


def test_retrieval_metrics_uses_the_transpose_for_text_queries():
    # 2 images x 3 captions; image 0 owns captions 0 and 1, image 1 owns caption 2.
    sim = np.array([[0.1, 0.9, 0.5],
                    [0.8, 0.2, 0.3]])
    truth = np.array([[1, 1, 0], [0, 0, 1]], bool)
    m = retrieval_metrics(sim, truth, ks=(1, 2))
    # image 0: best own caption 0.9 is top -> hit@1; image 1: own 0.3 below 0.8 -> rank 1.
    assert (m["i2t_R@1"], m["i2t_R@2"]) == (0.5, 1.0)
    # caption 0: own image scores 0.1 < 0.8 -> rank 1; caption 1: 0.9 > 0.2 hit; caption 2: 0.3 < 0.5 rank 1.
    assert m["t2i_R@1"] == pytest.approx(1 / 3)  # a float64 mean of 3 booleans: one rounding, far inside rel=1e-6
    assert m["t2i_R@2"] == 1.0


def test_topk_accuracy_on_4_images_and_3_classes():
    logits = np.array([[2.0, 1.0, 0.0],   # label 0: top-1
                       [2.0, 1.0, 0.0],   # label 1: second
                       [0.0, 1.0, 2.0],   # label 0: third
                       [0.5, 0.2, 0.9]])  # label 2: top-1
    labels = np.array([0, 1, 0, 2])
    assert topk_accuracy(logits, labels, 1) == 0.5
    assert topk_accuracy(logits, labels, 2) == 0.75
    assert topk_accuracy(logits, labels, 3) == 1.0


def test_prompt_ensemble_averages_normalised_templates_then_renormalises():
    # Class 0's two templates embed to (1, 0) and (0, 1): mean (0.5, 0.5), renormalised (0.7071, 0.7071).
    # Class 1's both embed to (0.6, 0.8): unchanged.
    z = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.6, 0.8]], np.float32)
    w = ensemble(z, n_classes=2, n_templates=2)
    # float32, relative per entry: 0.6 and 0.8 rounded (u), the mean of 2 (gamma_2), the renormalisation
    # (unit_norm_atol(2)); the constants are printed to 8 decimals.
    np.testing.assert_allclose(w, [[0.70710678, 0.70710678], [0.6, 0.8]],
                               rtol=U32 + reduction_rtol(2) + unit_norm_atol(2), atol=5e-9)


def test_recall_needs_a_correct_item_per_query():
    with pytest.raises(ValueError, match="at least one correct"):
        recall_at_k(SIM, np.zeros((4, 4), bool), 1)


# ---------------------------------------------------------------- datasets and the eval commands


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_idx_pair_reads_as_a_labelled_dataset(tmp_path):
    from koclip.evaluation.datasets import open_dataset

    pixels = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [2, 0, 1])
    ds = open_dataset(tmp_path, split="test", classnames=["바지", "가방", "코트"], templates=["{} 사진"])
    assert len(ds) == 3
    assert ds.captions(0) == ("코트 사진",)
    assert ds.image(1).size == (28, 28) and ds.image(1).mode == "RGB"


def test_class_folders_take_korean_names_from_classnames_file(tmp_path):
    from PIL import Image

    from koclip.evaluation.datasets import open_dataset

    for folder, n in (("cat", 2), ("dog", 1)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "classnames.txt").write_text("dog\t강아지\ncat\t고양이\n")
    ds = open_dataset(tmp_path, templates=["{}의 사진"])
    assert ds.classnames == ["고양이", "강아지"]  # sorted folder order: cat, dog
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.captions(2) == ("강아지의 사진",)


def test_caption_file_rows_without_image_or_caption_are_counted(tmp_path):
    from PIL import Image

    from koclip.evaluation.datasets import read_captions

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "captions": ["고양이"]}, {"image": "gone.png", "captions": ["개"]},
            {"image": "a.png", "captions": ["  "]}, {"captions": ["새"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    ds = read_captions(tmp_path / "d.jsonl")
    assert len(ds) == 1
    assert dict(ds.skipped) == {"missing_file": 1, "no_caption": 1, "no_image": 1, "bad_json": 1}


def test_koclip_json_format_is_read(tmp_path):
    from PIL import Image

    from koclip.evaluation.datasets import read_captions

    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    (tmp_path / "k.json").write_text(json.dumps([{"file_path": "x.jpg", "captions": ["한 장의 사진", "사진"]}]))
    ds = read_captions(tmp_path / "k.json")
    assert ds.captions(0) == ("한 장의 사진", "사진")


def test_eval_zeroshot_prints_a_table_and_writes_json_and_csv(tmp_path, tiny_model_dir, capsys):
    from koclip.cli import main

    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [0, 1, 2, 0, 1, 2])
    (tmp_path / "names.txt").write_text("바지\n가방\n코트\n")
    rc = main(["eval", "zeroshot", "--model", str(tiny_model_dir), "--dataset", str(tmp_path),
               "--classnames", str(tmp_path / "names.txt"), "--json", str(tmp_path / "r.json"),
               "--csv", str(tmp_path / "r.csv"), "-q"])
    assert rc == 0
    assert "코트" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 6 and set(result["per_class"]) == {"바지", "가방", "코트"}
    assert 0.0 <= result["top1"] <= 1.0
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "class,top1"


def test_zeroshot_table_lines_up_korean_and_english_class_names():
    import unicodedata

    from koclip.evaluation.cli import zeroshot_table

    table = zeroshot_table({"per_class": {"앵클 부츠": 0.5, "bag": 1.0, "티셔츠/상의": None},
                            "top1": 0.6, "top5": 1.0, "n": 5, "skipped": 0})
    columns = lambda line: sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)  # noqa: E731
    rows = table.splitlines()[:4]
    assert len({columns(r) for r in rows}) == 1, rows  # every percentage ends in the same terminal column


def test_eval_retrieval_reports_recall_both_ways(tmp_path, tiny_model_dir, capsys):
    from PIL import Image

    from koclip.cli import main

    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "captions": ["고양이 사진", "개"][: 1 + i % 2]})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    rc = main(["eval", "retrieval", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "c.jsonl"),
               "--json", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    assert "image->text" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 3 and result["captions"] == 4
    assert result["i2t_R@10"] == 1.0 and result["t2i_R@10"] == 1.0


def test_dataset_encoding_leaves_undecodable_images_out_and_encodes_the_rest_as_the_embedder(
        tmp_path, tiny_model_dir):
    from PIL import Image

    import koclip
    from koclip.config import TINY
    from koclip.evaluation.datasets import CaptionDataset
    from koclip.evaluation.encode import encode_images

    rng = np.random.default_rng(5)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(paths[-1])
    paths[2].write_bytes(b"not a png")
    model, processor = koclip.load(str(tiny_model_dir))
    ds = CaptionDataset([str(p) for p in paths], [("사진",)] * 5)
    z, ok = encode_images(model, processor, ds, batch_size=3, num_workers=2)
    assert ok.tolist() == [True, True, False, True, True]
    assert z.dtype == np.float32 and z.shape == (5, TINY.projection_dim) and not z[2].any()
    want = koclip.Embedder(model, processor).encode_images([paths[i] for i in (0, 1, 3, 4)])
    # Decoded in chunks of 3 (2 good images in each) against one batch of 4: another batch split of the
    # tiny vision tower, each entry within its bound (test_model.VISION_RTOL).
    vision_rtol = reduction_rtol(3 * TINY.vision.patch_size ** 2, depth=30)
    np.testing.assert_allclose(z[ok], want, rtol=0, atol=vision_rtol)
