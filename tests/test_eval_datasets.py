"""The benchmark readers (koclip.evaluation.benchmarks) on tiny files in each published format,
written here: Crossmodal-3600's captions.jsonl, XTD10's line-aligned text files with COCO 2014
folders, Babel-ImageNet's class-name JSON with ImageNet validation layouts, Fashion-MNIST's IDX."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from koclip.evaluation.benchmarks import (
    FASHION_MNIST_EN,
    babel_classnames,
    fashion_mnist,
    imagenet_val,
    open_benchmark,
    read_babel_imagenet,
    read_xm3600,
    read_xtd10,
)
from koclip.evaluation.datasets import CaptionDataset, ClassDataset, DatasetError

WNIDS = [f"n{i:08d}" for i in range(1000)]  # stand-ins for the 1000 ImageNet ids, in sorted order


def _image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


# ---------------------------------------------------------------- Crossmodal-3600


def _xm3600_row(key, **langs):
    row = {"image/key": key, "image/locale": "ko"}
    for lang, caps in langs.items():
        row[lang] = {"caption": caps, "caption/tokenized": [c.lower() for c in caps],
                     "caption/tokenized/lowercase": [c.lower() for c in caps]}
    return row


@pytest.fixture
def xm3600(tmp_path):
    rows = [_xm3600_row("a1", ko=["해변의 개 한 마리", "모래 위의 개"], en=["A dog on a beach"]),
            _xm3600_row("b2", ko=["빨간 자동차"], en=["A red car"]),      # no image file
            _xm3600_row("c3", en=["A cat"]),                              # no Korean captions
            _xm3600_row("d4", ko=["  산 위의   구름 "], en=["Clouds"])]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                             encoding="utf-8")
    for key in ("a1", "c3", "d4"):
        _image(tmp_path / "images" / f"{key}.jpg")
    return tmp_path


def test_xm3600_reads_the_captions_of_the_language_asked_for(xm3600):
    ds = read_xm3600(xm3600, "ko")
    assert isinstance(ds, CaptionDataset)
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == ["a1.jpg", "d4.jpg"]
    assert ds.captions(0) == ("해변의 개 한 마리", "모래 위의 개")
    assert ds.captions(1) == ("산 위의 구름",)  # whitespace normalised, as read_captions does
    assert dict(ds.skipped) == {"missing_file": 1, "no_caption": 1}
    en = read_xm3600(xm3600 / "captions.jsonl", "en")  # any language of the file, the file itself as data_dir
    assert [en.captions(i) for i in range(len(en))] == [("A dog on a beach",), ("A cat",), ("Clouds",)]


def test_xm3600_fingerprint_follows_the_language_and_not_the_folder(xm3600, tmp_path_factory):
    import shutil

    moved = tmp_path_factory.mktemp("moved") / "xm"
    shutil.copytree(xm3600, moved)
    assert read_xm3600(moved, "ko").fingerprint() == read_xm3600(xm3600, "ko").fingerprint()
    assert read_xm3600(xm3600, "en").fingerprint() != read_xm3600(xm3600, "ko").fingerprint()


def test_xm3600_names_the_languages_there_are_when_one_is_missing(xm3600):
    with pytest.raises(DatasetError, match=r"no captions in language 'sw'.*en, ko"):
        read_xm3600(xm3600, "sw")


def test_xm3600_without_captions_says_where_to_download_them(tmp_path):
    with pytest.raises(DatasetError, match="captions.zip.*crossmodal-3600"):
        read_xm3600(tmp_path, "ko")
    with pytest.raises(DatasetError, match="--data-dir"):
        read_xm3600(None, "ko")


def test_xm3600_without_images_says_where_they_go(xm3600, tmp_path_factory):
    with pytest.raises(DatasetError, match="none of the 4 images.*images.tgz"):
        read_xm3600(xm3600, "ko", image_root=tmp_path_factory.mktemp("empty"))


# ---------------------------------------------------------------- XTD10

XTD_NAMES = ["COCO_train2014_000000061844.jpg", "COCO_val2014_000000127068.jpg", "COCO_train2014_000000061849.jpg"]


@pytest.fixture
def xtd(tmp_path):
    repo = tmp_path / "Cross-lingual-Test-Dataset-XTD10"
    (repo / "XTD10").mkdir(parents=True)
    (repo / "MIC").mkdir()
    (repo / "XTD10" / "test_image_names.txt").write_text("\n".join(XTD_NAMES) + "\n")
    (repo / "XTD10" / "test_1kcaptions_ko.txt").write_text("책상 위의 고양이\n해변의 새떼\n얼룩말 떼\n",
                                                         encoding="utf-8")
    (repo / "MIC" / "test_1kcaptions_de.txt").write_text("Eine Katze\nVögel\nZebras\n", encoding="utf-8")
    coco = tmp_path / "coco"
    _image(coco / "train2014" / XTD_NAMES[0])
    _image(coco / "val2014" / XTD_NAMES[1])  # the third image is missing
    return repo, coco


def test_xtd10_aligns_captions_with_coco_images_from_both_splits(xtd):
    repo, coco = xtd
    ds = read_xtd10(repo, "ko", image_root=coco)
    assert ds.paths == [str(coco / "train2014" / XTD_NAMES[0]), str(coco / "val2014" / XTD_NAMES[1])]
    assert [ds.captions(i) for i in range(2)] == [("책상 위의 고양이",), ("해변의 새떼",)]
    assert dict(ds.skipped) == {"missing_file": 1}


def test_xtd10_finds_the_languages_kept_in_other_folders_of_the_repo(xtd):
    repo, coco = xtd
    assert read_xtd10(repo / "XTD10", "de", image_root=coco).captions(1) == ("Vögel",)
    with pytest.raises(DatasetError, match=r"no test_1kcaptions_tr.txt.*found: de, ko"):
        read_xtd10(repo, "tr", image_root=coco)


def test_xtd10_refuses_caption_files_that_are_not_line_aligned(xtd):
    repo, coco = xtd
    (repo / "XTD10" / "test_1kcaptions_ko.txt").write_text("하나\n둘\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="2 lines but .* names 3 images"):
        read_xtd10(repo, "ko", image_root=coco)


def test_xtd10_needs_the_coco_folder(xtd, tmp_path_factory):
    repo, _ = xtd
    with pytest.raises(DatasetError, match="--image-root.*train2014"):
        read_xtd10(repo, "ko")
    with pytest.raises(DatasetError, match="none of the 3 XTD10 images"):
        read_xtd10(repo, "ko", image_root=tmp_path_factory.mktemp("empty"))


# ---------------------------------------------------------------- ImageNet validation layouts and Babel-ImageNet


def _mapping(path):
    path.write_text("".join(f"{w} class number {i}\n" for i, w in enumerate(WNIDS)))


@pytest.fixture
def val_folders(tmp_path):
    """ILSVRC2012 val sorted into class folders (classes 0, 1 and 2 only) and Kaggle's mapping file."""
    root = tmp_path / "val"
    for c, n in ((0, 2), (1, 1), (2, 1)):
        for j in range(n):
            _image(root / WNIDS[c] / f"ILSVRC2012_val_{c * 10 + j:08d}.JPEG")
    _mapping(tmp_path / "LOC_synset_mapping.txt")
    return root


def test_imagenet_class_folders_take_their_index_from_the_synset_mapping(val_folders):
    paths, labels = imagenet_val(val_folders)
    assert [p.split("/")[-2] for p in paths] == [WNIDS[0], WNIDS[0], WNIDS[1], WNIDS[2]]
    assert labels.tolist() == [0, 0, 1, 2]
    assert imagenet_val(val_folders.parent)[1].tolist() == [0, 0, 1, 2]  # torchvision's root/val/<wnid>


def test_imagenet_class_folders_without_all_classes_or_a_mapping_are_refused(val_folders):
    (val_folders.parent / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(DatasetError, match="3 ImageNet classes found, not 1000.*LOC_synset_mapping.txt"):
        imagenet_val(val_folders)
    for w in WNIDS[3:]:
        (val_folders / w).mkdir()
    assert imagenet_val(val_folders)[1].tolist() == [0, 0, 1, 2]  # all 1000 there: sorted order


def test_flat_imagenet_val_reads_kaggles_solution_csv(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    for i in (1, 2, 3):
        _image(root / f"ILSVRC2012_val_{i:08d}.JPEG")
    _mapping(tmp_path / "LOC_synset_mapping.txt")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{WNIDS[7]} 10 20 30 40 {WNIDS[7]} 1 2 3 4\n"
        f"ILSVRC2012_val_00000001,{WNIDS[999]} 5 6 7 8\n"
        f"ILSVRC2012_val_00000003,{WNIDS[0]} 5 6 7 8\n"
        f"ILSVRC2012_val_00000004,{WNIDS[5]} 5 6 7 8\n")  # no such file here: left out
    paths, labels = imagenet_val(root)  # both files found up the tree, as Kaggle's download lays them out
    assert [p.rsplit("_", 1)[1] for p in paths] == ["00000001.JPEG", "00000002.JPEG", "00000003.JPEG"]
    assert labels.tolist() == [999, 7, 0]


def test_flat_imagenet_val_reads_file_and_class_index_lines(tmp_path):
    for i in (1, 2):
        _image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG 970\n")
    assert imagenet_val(tmp_path / "val", tmp_path / "val.txt")[1].tolist() == [65, 970]
    (tmp_path / "gt.txt").write_text("490\n361\n")  # the devkit's ILSVRC2012_IDs: another numbering
    with pytest.raises(DatasetError, match="ILSVRC2012_ID"):
        imagenet_val(tmp_path / "val", tmp_path / "gt.txt")


def _babel(path, table):
    path.write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    return path


def test_babel_classnames_are_looked_up_by_language_code_in_any_case(tmp_path):
    _babel(tmp_path / "babel_imagenet-298.json", {"KO": [[2, 0], ["구이", "영"]], "FR": [[1], ["un"]]})
    assert babel_classnames(tmp_path, "ko") == ([2, 0], ["구이", "영"])
    with pytest.raises(DatasetError, match="no class names for language 'xx'; 2 languages"):
        babel_classnames(tmp_path, "xx")
    _babel(tmp_path / "bad.json", {"KO": [[2, 2], ["a", "b"]]})
    with pytest.raises(DatasetError, match="distinct class indices"):
        babel_classnames(tmp_path / "bad.json", "KO")


def test_babel_imagenet_keeps_the_images_of_named_classes_under_their_names(tmp_path, val_folders):
    _babel(tmp_path / "babel_imagenet-298.json", {"KO": [[2, 0], ["이이", "영영"]]})
    ds = read_babel_imagenet(tmp_path, "ko", image_root=val_folders)
    assert isinstance(ds, ClassDataset) and ds.classnames == ["이이", "영영"]
    # class 0's two images become class 1 of the dataset, class 2's image class 0, class 1 is left out
    assert [(p.split("/")[-2], int(c)) for p, c in zip(ds.paths, ds.labels)] == [
        (WNIDS[0], 1), (WNIDS[0], 1), (WNIDS[2], 0)]
    with pytest.raises(DatasetError, match="--image-root"):
        read_babel_imagenet(tmp_path, "ko")


# ---------------------------------------------------------------- Fashion-MNIST and the names


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_has_korean_and_english_names(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [9, 0])
    ko, en = fashion_mnist("ko", data_dir=tmp_path), fashion_mnist("en", data_dir=tmp_path)
    assert ko.classnames[ko.labels[0]] == "앵클 부츠" and en.classnames[en.labels[0]] == FASHION_MNIST_EN[9]
    with pytest.raises(DatasetError, match="ko and en, not 'fr'"):
        fashion_mnist("fr", data_dir=tmp_path)


def test_an_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(DatasetError, match="xm3600, xtd10, babel-imagenet, fashion-mnist"):
        open_benchmark("coco-ko")
