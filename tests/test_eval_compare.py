"""`koclip eval compare` and koclip.evaluation.compare: one table of models x prompt settings, kept in a
results file that a rerun fills in, with failure rows for models that cannot be loaded."""

from __future__ import annotations

import gzip
import json
import struct
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from koclip.errors import KoclipError, UnknownModelError
from koclip.evaluation.compare import (
    compare,
    prompt_settings,
    read_rows,
    rows_csv,
    select,
    write_rows,
)
from koclip.evaluation.datasets import CaptionDataset, ClassDataset

NAMES = ["바지", "가방", "코트"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import koclip

    return koclip.load(str(tiny_model_dir))


class Loader:
    """A load hook that counts loads by name: "tiny" is the tiny model, anything else fails as an
    unknown name would."""

    def __init__(self, tiny):
        self.tiny, self.loads = tiny, Counter()

    def __call__(self, name):
        self.loads[name] += 1
        if name == "tiny":
            return self.tiny
        raise UnknownModelError(f"unknown model {name!r}")


def _class_dataset(seed=0, n=6):
    rng = np.random.default_rng(seed)
    return ClassDataset(NAMES, np.arange(n) % 3, pixels=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                        source=f"test:{seed}")


def _caption_dataset(tmp_path):
    paths, texts = [], []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0), (90, 90, 90)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 40), colour).save(paths[-1])
        texts.append(("빨간 가방", "파란 코트", "개")[: 1 + i % 3])
    return CaptionDataset(paths, texts, source="test")


def test_zeroshot_rows_are_one_per_prompt_setting_and_match_evaluate_zeroshot(tiny):
    from koclip.evaluation.zeroshot import evaluate_zeroshot

    ds = _class_dataset()
    prompts = prompt_settings("zeroshot", "ko")
    assert [p.name for p in prompts] == ["label", "이것은 {} 이다", "ko ensemble (6)"]
    rows = compare(["tiny"], ds, name="toy", lang="ko", prompts=prompts, load=Loader(tiny))
    assert [(r["model"], r["prompt"], r["status"]) for r in rows] == [("tiny", p.name, "ok") for p in prompts]
    for r, p in zip(rows, prompts):
        # the same images and class embeddings as `koclip eval zeroshot`, encoded once for all three settings
        want = evaluate_zeroshot(*tiny, ds, templates=p.templates)
        assert (r["top1"], r["top5"], r["images"], r["classes"]) == (want["top1"], want.get("top5"), 6, 3)
        assert r["templates"] == list(p.templates) and r["data"] == ds.fingerprint()


def test_retrieval_rows_use_all_captions_or_only_the_first(tiny, tmp_path):
    from koclip.evaluation.retrieval import evaluate_retrieval

    ds = _caption_dataset(tmp_path)
    prompts = prompt_settings("retrieval", "ko", captions=["all", "first"])
    rows = compare(["tiny"], ds, name="toy", lang="ko", prompts=prompts, load=Loader(tiny))
    assert [(r["prompt"], r["images"], r["texts"]) for r in rows] == [("all captions", 4, 7), ("first caption", 4, 4)]
    for r, mode in zip(rows, ("all", "first")):
        want = evaluate_retrieval(*tiny, ds, captions=mode)
        assert {k: r[k] for k in want if "R@" in k} == {k: v for k, v in want.items() if "R@" in k}
    assert rows[1]["t2i_R@10"] == 1.0 and rows[1]["i2t_R@10"] == 1.0  # 4 items: every hit is within 10


def test_a_model_that_cannot_be_loaded_gives_failure_rows_and_the_others_still_run(tiny):
    load = Loader(tiny)
    prompts = prompt_settings("zeroshot", "ko", ["label", "ko"])
    rows = compare(["mclip-b32", "tiny"], _class_dataset(), name="toy", lang="ko", prompts=prompts, load=load)
    failed = [r for r in rows if r["model"] == "mclip-b32"]
    assert [r["status"] for r in failed] == ["failed", "failed"]
    assert failed[0]["error"] == "UnknownModelError: unknown model 'mclip-b32'" and "top1" not in failed[0]
    assert [r["status"] for r in rows if r["model"] == "tiny"] == ["ok", "ok"]
    assert load.loads == {"mclip-b32": 1, "tiny": 1}


def test_a_rerun_measures_only_missing_or_failed_rows_and_leaves_the_others_as_they_were(tiny):
    ds, prompts = _class_dataset(), prompt_settings("zeroshot", "ko", ["label", "ko"])
    first = compare(["tiny", "mclip-b32"], ds, name="toy", lang="ko", prompts=prompts, load=Loader(tiny))
    load = Loader(tiny)
    saved = []
    again = compare(["tiny", "mclip-b32"], ds, name="toy", lang="ko", prompts=prompts, rows=first, load=load,
                    save=saved.append)
    assert load.loads == {"mclip-b32": 1}  # the tiny model's rows were all there: it was not loaded
    assert [r for r in again if r["model"] == "tiny"] == [r for r in first if r["model"] == "tiny"]
    assert len(saved) == 1 and saved[0] == again
    # a new prompt setting: one row to measure, so the model is loaded once more, for that row only
    more = prompt_settings("zeroshot", "ko", ["label", "ko", "{}의 사진"])
    load = Loader(tiny)
    third = compare(["tiny"], ds, name="toy", lang="ko", prompts=more, rows=again, load=load)
    assert load.loads == {"tiny": 1}
    assert [r for r in third if r["model"] == "tiny"][:2] == [r for r in first if r["model"] == "tiny"]
    assert select(third, ["tiny"], name="toy", lang="ko", prompts=more)[2]["prompt"] == "{}의 사진"


@pytest.mark.parametrize("change", ["redo", "other data", "other limit", "other templates"])
def test_rows_are_measured_again_when_asked_or_when_what_they_measured_changed(tiny, change):
    ds, prompts = _class_dataset(), prompt_settings("zeroshot", "ko", ["label"])
    rows = compare(["tiny"], ds, name="toy", lang="ko", prompts=prompts, load=Loader(tiny))
    kw = dict(name="toy", lang="ko", prompts=prompts, rows=rows, redo=change == "redo",
              limit=4 if change == "other limit" else 0)
    if change == "other templates":  # a templates file edited since: same name, other templates
        rows[0]["templates"] = ["{} 사진"]
    load = Loader(tiny)
    again = compare(["tiny"], _class_dataset(seed=1) if change == "other data" else ds, load=load, **kw)
    assert load.loads == {"tiny": 1}
    assert len(again) == (2 if change == "other limit" else 1)  # another limit is another row


def test_results_round_trip_through_json_and_csv(tiny, tmp_path):
    prompts = prompt_settings("zeroshot", "ko")
    rows = compare(["tiny", "nope"], _class_dataset(), name="toy", lang="ko", prompts=prompts, load=Loader(tiny))
    write_rows(rows, tmp_path / "r.json", tmp_path / "r.csv")
    assert read_rows(tmp_path / "r.json", tmp_path / "r.csv") == rows
    from_csv = read_rows(None, tmp_path / "r.csv")
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in from_csv] == \
        [{k: v for k, v in r.items() if not isinstance(v, float) and v is not None} for r in rows]
    for a, b in zip(from_csv, rows):  # fractions kept to 6 decimals
        assert all(abs(a[k] - b[k]) <= 5e-7 for k in b if isinstance(b[k], float))
    assert rows_csv(rows).splitlines()[0].startswith("model,dataset,lang,prompt,limit,status,t2i_R@1")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(KoclipError, match="not a results file"):
        read_rows(tmp_path / "bad.json")


def test_prompt_settings_refuse_what_does_not_apply(tmp_path):
    with pytest.raises(KoclipError, match="--templates is for zero-shot"):
        prompt_settings("retrieval", "ko", templates=["ko"])
    with pytest.raises(KoclipError, match="valid: all, first"):
        prompt_settings("retrieval", "ko", captions=["some"])
    with pytest.raises(KoclipError, match="not 'label', 'ko', 'en'"):
        prompt_settings("zeroshot", "ko", ["사진"])
    (tmp_path / "mine.txt").write_text("{} 사진\n\n{}의 그림\n", encoding="utf-8")
    (p,) = prompt_settings("zeroshot", "ko", [str(tmp_path / "mine.txt")])
    assert (p.name, p.templates) == ("mine (2)", ("{} 사진", "{}의 그림"))
    assert [p.name for p in prompt_settings("zeroshot", "ja")] == ["label"]


# ---------------------------------------------------------------- the command


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_compare_command_prints_one_table_saves_it_and_fills_it_in(tiny_model_dir, tmp_path, capsys):
    import unicodedata

    from koclip.cli import main

    data = tmp_path / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", [0, 1, 2, 9, 8, 7])
    argv = ["eval", "compare", "--models", f"{tiny_model_dir},no-such-model", "--dataset", "fashion-mnist",
            "--data-dir", str(data), "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Fashion-MNIST (fashion-mnist, ko): 6 of 6 images"
    table = lines[1:8]
    columns = lambda s: sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)  # noqa: E731
    assert len({columns(row) for row in table[:4]}) == 1, table  # header and the model's rows line up
    assert "failed: UnknownModelError: unknown model 'no-such-model'" in table[4]
    rows = json.loads((tmp_path / "out" / "compare-fashion-mnist-ko.json").read_text())["rows"]
    assert [(r["prompt"], r["status"]) for r in rows] == [
        ("label", "ok"), ("이것은 {} 이다", "ok"), ("ko ensemble (6)", "ok"),
        ("label", "failed"), ("이것은 {} 이다", "failed"), ("ko ensemble (6)", "failed")]
    assert (tmp_path / "out" / "compare-fashion-mnist-ko.csv").read_text().count("\n") == 7
    assert main(argv) == 0  # the rerun measures the failed rows only: the same table
    assert capsys.readouterr().out == out


def test_compare_command_errors_name_the_bad_value(tmp_path, capsys):
    from koclip.cli import main

    assert main(["eval", "compare", "--models", "x", "--dataset", "coco"]) == 2
    assert "--dataset 'coco': valid: xm3600, xtd10, babel-imagenet, fashion-mnist" in capsys.readouterr().err
    assert main(["eval", "compare", "--models", "x", "--dataset", "xm3600", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path)]) == 2
    assert "captions.zip" in capsys.readouterr().err
