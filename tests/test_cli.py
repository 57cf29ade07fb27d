"""Tests for the `koclip` command itself (its index, train and eval subcommands are tested beside those)."""

import shutil

import pytest

import koclip
from koclip.cli import main
from koclip.data import gallery_dir
from numerics import reduction_rtol

COFFEE = gallery_dir() / "coffee.jpg"


@pytest.fixture
def loads(mini, monkeypatch):
    """koclip.load replaced by one returning the module's koclip-mini; returns the names asked for."""
    asked = []

    def load(name, **kwargs):
        asked.append(name)
        return mini

    monkeypatch.setattr(koclip, "load", load)
    return asked


@pytest.fixture
def served(http_server, tmp_path):
    """coffee.jpg served on 127.0.0.1; its URL."""
    shutil.copy(COFFEE, tmp_path / "coffee.jpg")
    return f"{http_server}/coffee.jpg"


def ranking(out: str) -> list[tuple[float, str]]:
    rows = [line.split("%", 1) for line in out.strip().splitlines()]
    return [(float(p), label.strip()) for p, label in rows]


def test_classify_ranks_the_labels_and_says_which_it_ignored(loads, capsys):
    assert main(["classify", str(COFFEE), "고양이", "커피", " ", "커피", "자동차"]) == 0
    out, err = capsys.readouterr()
    rows = ranking(out)
    labels = [label for _, label in rows]
    assert labels[0] == "커피" and sorted(labels) == ["고양이", "자동차", "커피"]
    # Each printed to 0.01 (<= 0.005 off); the float64 softmax sums to 1 within gamma_k + u.
    shown_atol = 0.005 * len(rows) + 100 * (reduction_rtol(len(rows), u=2.0 ** -53) + 2.0 ** -53)
    assert sum(p for p, _ in rows) == pytest.approx(100, abs=shown_atol)
    assert "ignored 2 blank or repeated label(s)" in err
    assert loads == ["koclip-mini"]


def test_classify_reads_an_image_url(loads, served, capsys, monkeypatch):
    assert main(["classify", str(COFFEE), "커피", "고양이", "--model", "my-model"]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setenv("KOCLIP_ALLOW_PRIVATE_URLS", "1")  # the test server is on loopback
    assert main(["classify", served, "커피", "고양이", "--model", "my-model"]) == 0
    assert capsys.readouterr().out == from_file
    assert loads == ["my-model", "my-model"]


@pytest.mark.parametrize("argv, message", [
    (["classify", "missing.jpg", "a", "b"], "image file 'missing.jpg' does not exist"),
    (["classify", str(COFFEE), "커피", " 커피 "], "at least two distinct, non-empty labels"),
    (["classify", str(COFFEE), "a", "b", "--template", "이것은 고양이"], "has no '{}'"),
    (["classify", "http://127.0.0.1:9/cat.jpg", "a", "b"], "refused"),
])
def test_bad_input_fails_before_the_model_loads(argv, message, monkeypatch, capsys):
    monkeypatch.delenv("KOCLIP_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setattr(koclip, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("koclip: error: ") and message in err


def test_a_file_that_is_not_an_image_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    monkeypatch.setattr(koclip, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(["classify", str(tmp_path / "notes.jpg"), "a", "b"]) == 2
    assert "not an image in a supported format" in capsys.readouterr().err


def test_an_empty_search_query_is_refused(tmp_path, capsys):
    assert main(["index", "search", str(tmp_path / "any.kidx"), "바다", "  "]) == 2
    assert "a search query is empty" in capsys.readouterr().err
