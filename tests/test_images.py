"""Tests for koclip.images: safe decoding, preprocessing parity, grids."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, features

from koclip.errors import ImageError
from koclip.images import CLIP, PRESETS, VIT, ImagePreprocess, open_image, preprocess, split_grid
from numerics import U32

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "images")


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gradient(width=40, height=30) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8), "RGB")


# ------------------------------------------------------------- open_image

@pytest.mark.parametrize("kind", ["path", "bytes", "file", "pil"])
def test_open_image_accepts_every_source_kind(kind, tmp_path):
    im = gradient()
    data = encode(im, "PNG")
    path = tmp_path / "g.png"
    path.write_bytes(data)
    source = {"path": path, "bytes": data, "file": io.BytesIO(data), "pil": im}[kind]
    out = open_image(source)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(im))


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = open_image(encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left strip is now on top


def test_rgba_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(open_image(encode(im, "PNG")))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_la_half_transparent_black_becomes_mid_grey():
    out = np.asarray(open_image(Image.new("LA", (2, 2), (0, 128))))
    assert np.all(np.abs(out.astype(int) - 127) <= 1)


def test_palette_transparency_is_composited_on_white():
    im = Image.new("P", (3, 3), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    out = np.asarray(open_image(encode(im, "PNG", transparency=1)))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 0)


def test_grayscale_becomes_three_equal_channels():
    out = np.asarray(open_image(encode(Image.new("L", (3, 2), 77), "PNG")))
    assert out.shape == (2, 3, 3) and np.all(out == 77)


def test_cmyk_jpeg_becomes_rgb():
    out = np.asarray(open_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)))
    r, g, b = out[4, 4].astype(int)
    assert r > 230 and g < 30 and b < 30


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    out = np.asarray(open_image(encode(Image.fromarray(a), "PNG")))
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_float_image_in_unit_range_is_scaled_to_255():
    out = np.asarray(open_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))))
    assert list(out[0, :, 1]) == [0, 128, 255]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert tuple(np.asarray(open_image(data))[3, 3]) == (255, 0, 0)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert tuple(np.asarray(open_image(data))[8, 8]) == (255, 0, 0)


def test_too_many_pixels_is_refused_with_sizes_in_message():
    with pytest.raises(ImageError, match=r"40x30 = 1,200 pixels, over the limit of 1,000"):
        open_image(encode(gradient(), "PNG"), max_pixels=1000)


def test_bomb_is_refused_from_header_before_decoding():
    # No pixel data at all: decoding would fail as "truncated", so a size
    # error proves the check happens on the header.
    with pytest.raises(ImageError, match="over the limit"):
        open_image(png_header_only(9000, 9000))


def test_huge_bomb_over_pillows_own_limit_is_an_image_error_without_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="decompression bomb"):
            open_image(png_header_only(100_000, 100_000))
        with pytest.raises(ImageError, match="over the limit"):
            open_image(png_header_only(10_000, 10_000))  # over Pillow's warning threshold
    assert caught == []


def test_truncated_file_is_an_image_error():
    data = encode(gradient(200, 200), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data[: len(data) // 2], name="cut.jpg")


def test_text_is_not_an_image_and_message_lists_valid_formats():
    with pytest.raises(ImageError, match=r"'notes.txt'.*not an image.*valid formats are JPEG, PNG"):
        open_image(b"just some words", name="notes.txt")


def test_html_page_is_recognised_as_html():
    with pytest.raises(ImageError, match="HTML"):
        open_image(b"<!DOCTYPE html><html><body>404</body></html>")


def test_empty_bytes_say_empty():
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")


def test_missing_path_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "nope.png")


def test_unsupported_format_eps_is_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="valid formats"):
        open_image(eps)


# ------------------------------------------------------------- preprocess

def load_reference():
    ref = np.load(os.path.join(FIXTURES, "reference.npz"))
    out = {}
    for key in ref.files:
        if key.endswith(".codes_png"):
            name, preset, _ = key.split(".")
            codes = np.asarray(Image.open(io.BytesIO(ref[key].tobytes())))
            lut = ref[f"{name}.{preset}.lut"]
            out[name, preset] = np.stack([lut[c][codes[..., c]] for c in range(3)], axis=-1)
    return out


REFERENCE = load_reference()


@pytest.mark.parametrize("name,preset", sorted(REFERENCE))
def test_preprocess_matches_transformers_processor(name, preset):
    expected = REFERENCE[name, preset]
    assert expected.shape == (224, 224, 3) and not np.isnan(expected).any()
    got = preprocess(os.path.join(FIXTURES, f"{name}.png"), PRESETS[preset])
    assert got.shape == (1, 224, 224, 3) and got.dtype == np.float32
    # The same uint8 codes, normalised by both in float32: each side rounds the rescaled pixel, the mean
    # and std, the difference and the quotient, at most 4 roundings of values up to (1 + mean) / std.
    # A pixel resized to another code is off by 1 / 255 / std >= 0.014.
    spec = PRESETS[preset]
    atol = 2 * 4 * U32 * max((1 + m) / s for m, s in zip(spec.mean, spec.std))
    assert np.abs(got[0] - expected).max() <= atol


def test_reference_covers_both_presets_and_all_sizes():
    assert {p for _, p in REFERENCE} == {"clip", "vit"}
    assert {n for n, _ in REFERENCE} >= {"wide", "tall", "tiny", "square224", "big"}


def test_preprocess_batches_in_order_and_accepts_preset_names():
    a, b = gradient(40, 30), gradient(30, 50)
    batch = preprocess([a, b], "clip")
    assert batch.shape == (2, 224, 224, 3)
    assert np.array_equal(batch[1], preprocess(b, CLIP)[0])


def test_preprocess_of_no_images_is_an_empty_batch():
    assert preprocess([], VIT).shape == (0, 224, 224, 3)


def test_unknown_preset_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'imagenet22k'.*'clip'"):
        preprocess([gradient()], "imagenet22k")


def test_shortest_resize_rounds_long_side_down_like_transformers():
    # 83x250 -> 224 x int(224*250/83 = 674.7) = 674, then crop rows (674-224)//2 = 225 onwards.
    im = Image.new("RGB", (83, 250))
    arr = np.zeros((250, 83, 3), np.uint8)
    arr[125:] = 255  # bottom half white
    im = Image.fromarray(arr)
    spec = ImagePreprocess(size=224, resize="shortest", crop=True, resample="nearest",
                           mean=(0, 0, 0), std=(1, 1, 1))
    out = preprocess(im, spec)[0, :, 0, 0]
    # Row r of the crop is row r+225 of the 674-row image; white starts at 337.
    assert out[111] == 0.0 and out[112] == 1.0


def test_resize_size_allows_resize_then_smaller_crop():
    spec = ImagePreprocess(size=224, resize="shortest", crop=True, resample="bilinear",
                           mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=256)
    assert preprocess(gradient(), spec).shape == (1, 224, 224, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(resize="shortest", crop=False), "crop must be True"),
    (dict(resize="fit"), "'shortest' or 'exact'"),
    (dict(resample="cubic"), "resample must be one of"),
    (dict(mean=(0.5, 0.5)), "3 values"),
    (dict(std=(0.5, 0.0, 0.5)), "> 0"),
    (dict(size=0), "positive int"),
    (dict(resize_size=100), "resize_size"),
])
def test_invalid_preprocess_spec_is_rejected(kwargs, match):
    base = dict(size=224, resize="shortest", crop=True, resample="bicubic", mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError, match=match):
        ImagePreprocess(**{**base, **kwargs})


def test_presets_are_frozen():
    with pytest.raises(AttributeError):
        CLIP.size = 336


# ------------------------------------------------------------- split_grid

def test_grid_leftover_pixels_go_to_last_row_and_column():
    boxes = [box for box, _ in split_grid(Image.new("RGB", (10, 7)), 2, 3)]
    assert boxes == [(0, 0, 3, 3), (3, 0, 6, 3), (6, 0, 10, 3),
                     (0, 3, 3, 7), (3, 3, 6, 7), (6, 3, 10, 7)]


def test_grid_crops_match_their_boxes():
    im = gradient(40, 30)
    for box, crop in split_grid(im, 3, 4):
        assert crop.size == (box[2] - box[0], box[3] - box[1])
        assert np.array_equal(np.asarray(crop), np.asarray(im)[box[1]:box[3], box[0]:box[2]])


def test_one_by_one_grid_is_the_whole_image():
    [(box, crop)] = split_grid(gradient(), 1, 1)
    assert box == (0, 0, 40, 30) and crop.size == (40, 30)


@pytest.mark.parametrize("rows,cols", [(0, 2), (9, 2), (2, -1), (2.0, 2), (True, 2)])
def test_grid_size_outside_1_to_8_is_rejected(rows, cols):
    with pytest.raises(ValueError, match="from 1 to 8"):
        split_grid(gradient(), rows, cols)


def test_grid_finer_than_image_is_an_image_error():
    with pytest.raises(ImageError, match="too small"):
        split_grid(Image.new("RGB", (5, 3)), 4, 4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_damaged_files_give_rgb_or_image_error_and_no_warnings(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), fmt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for trial in range(40):
            d = bytearray(data)
            if trial % 2:
                d = d[: int(rng.integers(0, len(d)))]  # truncated
            else:
                for i in rng.integers(0, len(d), size=4):  # flipped bytes
                    d[i] = int(rng.integers(0, 256))
            try:
                assert open_image(bytes(d)).mode == "RGB"
            except ImageError:
                pass
    assert [str(w.message) for w in caught] == []


def test_non_seekable_stream_is_read():
    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.inner.readinto(b)

    assert open_image(Pipe(encode(gradient(), "PNG"))).size == (40, 30)
