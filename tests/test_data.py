"""Bundled data: ImageNet class names (en/ko), parent categories, the photo gallery."""

import re

import pytest
from PIL import Image

from koclip import data
from koclip.data import NUM_CLASSES, ZEROSHOT_LABELS, categories, gallery, imagenet_classes

HANGUL = re.compile("[\uac00-\ud7a3]")


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_class_list_has_one_name_per_class(lang):
    assert len(imagenet_classes(lang)) == NUM_CLASSES


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_class_names_are_unique_and_not_blank(lang):
    names = imagenet_classes(lang)
    assert all(names)
    assert len({n.casefold() for n in names}) == NUM_CLASSES


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_class_files_have_exactly_1000_lines(lang):
    # people and shell tools find class i on line i+1, so no blank or extra lines
    text = (data._DIR / f"imagenet_{lang}.txt").read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == NUM_CLASSES
    assert [line for line in text.splitlines() if line != line.strip()] == []


def test_english_names_follow_imagenet_index_order():
    en = imagenet_classes("en")
    assert en[:3] == ["tench", "goldfish", "great white shark"]
    assert (en[151], en[207], en[281], en[999]) == (
        "Chihuahua", "golden retriever", "tabby cat", "toilet paper")


def test_english_names_have_no_wordnet_underscores():
    assert not [n for n in imagenet_classes("en") if "_" in n]


def test_duplicate_wordnet_lemmas_are_told_apart():
    en = imagenet_classes("en")
    assert en[134] != en[517]  # crane the bird, crane the machine
    assert en[638] != en[639]  # the two 'maillot' synsets


def test_every_korean_name_contains_hangul():
    assert [n for n in imagenet_classes("ko") if not HANGUL.search(n)] == []


def test_korean_names_line_up_with_english_ones():
    en, ko = imagenet_classes("en"), imagenet_classes("ko")
    spot = {1: "금붕어", 2: "백상아리", 7: "수탉", 207: "골든 리트리버", 250: "시베리안 허스키",
            291: "사자", 504: "머그컵", 954: "바나나", 967: "에스프레소", 968: "커피잔"}
    assert {i: ko[i] for i in spot} == spot
    assert (en[291], en[954]) == ("lion", "banana")


def test_unknown_language_names_the_valid_ones():
    with pytest.raises(ValueError, match="'ja'.*'en', 'ko'"):
        imagenet_classes("ja")


def test_returned_class_list_is_a_copy():
    imagenet_classes("en")[0] = "changed"
    assert imagenet_classes("en")[0] == "tench"


def test_there_are_at_least_40_categories_with_unique_names():
    cats = categories()
    assert len(cats) >= 40
    assert len({c.ko for c in cats}) == len(cats) == len({c.en for c in cats})
    assert all(HANGUL.search(c.ko) for c in cats)


def test_category_members_are_valid_sorted_class_indices():
    for c in categories():
        assert c.classes, c
        assert list(c.classes) == sorted(set(c.classes)), c
        assert all(0 <= i < NUM_CLASSES for i in c.classes), c


def _category(en):
    return next(c for c in categories() if c.en == en)


def test_dog_category_is_exactly_the_dog_breeds():
    assert _category("dog").classes == tuple(range(151, 269))


def test_category_members_have_plausible_english_names():
    en = imagenet_classes("en")
    assert {en[i] for i in _category("cat").classes} >= {"tabby cat", "Persian cat", "Siamese cat"}
    assert all("butterfly" in en[i] for i in _category("butterfly").classes)
    assert all("snake" in en[i] or en[i] in {"boa constrictor", "rock python", "Indian cobra",
                                            "green mamba", "horned viper", "sidewinder"}
               for i in _category("snake").classes)
    assert all("spider" in en[i] or en[i] in {"black widow", "tarantula"}
               for i in _category("spider").classes)
    assert {en[i] for i in _category("horse").classes} == {"sorrel horse"}
    assert "zebra" not in {en[i] for i in _category("horse").classes}


def test_subcategories_lie_inside_their_parents():
    for child, parent in [("butterfly", "insect"), ("beetle", "insect"), ("shark", "fish"),
                          ("parrot", "bird"), ("duck", "bird"), ("poodle", "dog"),
                          ("guitar", "musical instrument"), ("chair", "furniture")]:
        assert set(_category(child).classes) <= set(_category(parent).classes), child


def test_bad_class_range_names_the_range():
    with pytest.raises(ValueError, match="'990-1001'"):
        data._parse_ranges("5,990-1001")


def test_class_ranges_expand_inclusively():
    assert data._parse_ranges("3-5,9") == (3, 4, 5, 9)


def test_gallery_has_at_least_30_photos_with_unique_files():
    photos = gallery()
    assert len(photos) >= 30
    assert len({p.path.name for p in photos}) == len(photos)


def test_every_gallery_photo_opens_as_small_rgb_jpeg():
    for p in gallery():
        assert p.path.parent == data.gallery_dir()
        with Image.open(p.path) as im:
            im.load()
            assert (im.format, im.mode) == ("JPEG", "RGB"), p.path.name
            assert max(im.size) <= 640 and min(im.size) >= 100, p.path.name


def test_every_gallery_photo_names_its_source_and_licence():
    for p in gallery():
        assert re.fullmatch(r"[\w.-]+==[\w.]+:\S+", p.source), p
        assert p.licence.strip(), p
    licences = (data.gallery_dir() / "LICENSES.md").read_text(encoding="utf-8")
    assert all(p.path.name in licences for p in gallery())


def test_gallery_folder_has_no_unlisted_photos():
    listed = {p.path.name for p in gallery()}
    assert {f.name for f in data.gallery_dir().glob("*.jpg")} == listed


def test_every_gallery_label_is_a_zeroshot_label():
    labels = set(ZEROSHOT_LABELS)
    assert [p.path.name for p in gallery() if (p.label_ko, p.label_en) not in labels] == []


def test_zeroshot_labels_are_unique_pairs_of_korean_and_english():
    assert len(ZEROSHOT_LABELS) >= 20
    assert len({ko for ko, _ in ZEROSHOT_LABELS}) == len(ZEROSHOT_LABELS)
    assert len({en for _, en in ZEROSHOT_LABELS}) == len(ZEROSHOT_LABELS)
    assert all(HANGUL.search(ko) and en.isascii() for ko, en in ZEROSHOT_LABELS)
