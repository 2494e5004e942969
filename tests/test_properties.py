"""Property-based tests (Hypothesis): whatever the file name or the bytes, reading a patch
either gives a patch or a reason, never an exception."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from histoscreen.constants import MAX_SLIDE_PX, PATCH_SIZE
from histoscreen.data import FileSource
from histoscreen.data.naming import on_grid
from histoscreen.data.patch_files import PNG_SIGNATURE, check_name, decode_patch_bytes

numbers = st.one_of(
    st.integers(min_value=0, max_value=200).map(lambda n: 50 * n + 1),  # on the grid
    st.integers(min_value=-(10**12), max_value=10**13),
    st.sampled_from([0, 1, 26, 51, MAX_SLIDE_PX - 49, MAX_SLIDE_PX + 1, 10_000_000_001]),
)
names = st.one_of(
    st.builds(
        lambda p, x, y, c, ext: f"{p}_idx5_x{x}_y{y}_class{c}{ext}",
        st.one_of(st.integers(min_value=0, max_value=10**9).map(str), st.text(min_size=0, max_size=8)),
        numbers, numbers, st.sampled_from(["0", "1", "2", "01", ""]), st.sampled_from([".png", ".PNG", ".jpg", "", ".png.bak"]),
    ),
    st.text(min_size=1, max_size=60),
).filter(lambda name: "/" not in name and "\x00" not in name and name not in (".", ".."))
folders = st.lists(st.sampled_from(["0", "1", "9023", "10253", "x", "IDC_regular_ps50_idx5", "ü"]), max_size=3)


@settings(max_examples=400, deadline=None)
@given(folders, names)
def test_any_name_is_a_patch_name_or_a_reason(parents, name):
    parsed, reason = check_name(Path("/data", *parents, name))
    assert (parsed is None) != (reason is None)
    if parsed is not None:
        assert on_grid(parsed.x) and on_grid(parsed.y) and parsed.x <= MAX_SLIDE_PX and parsed.y <= MAX_SLIDE_PX
        assert parsed.label in (0, 1)
    else:
        assert isinstance(reason, str) and reason


def assert_patch_or_reason(data: bytes) -> None:
    decoded = decode_patch_bytes(data)
    assert (decoded.pixels is None) != (decoded.reason is None)
    if decoded.pixels is not None:
        assert decoded.pixels.shape == (PATCH_SIZE, PATCH_SIZE, 3) and decoded.pixels.dtype == np.uint8
        assert 1 <= decoded.width <= PATCH_SIZE and 1 <= decoded.height <= PATCH_SIZE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_a_patch_or_a_reason(data):
    assert_patch_or_reason(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1),
    st.sampled_from([1, 2, 4, 8, 16, 3]), st.sampled_from([0, 2, 3, 4, 6, 7]), st.binary(max_size=512),
)
def test_any_png_header_is_a_patch_or_a_reason(width, height, depth, colour, tail):
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    assert_patch_or_reason(PNG_SIGNATURE + header + tail)
    assert_patch_or_reason(PNG_SIGNATURE + header + png_chunk(b"IDAT", zlib.compress(tail)) + png_chunk(b"IEND", b""))


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), st.sampled_from(["RGB", "RGBA", "L", "P", "I;16", "1"]))
def test_real_pngs_are_accepted_exactly_when_small_rgb(width, height, mode):
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    decoded = decode_patch_bytes(buffer.getvalue())
    acceptable = mode == "RGB" and width <= PATCH_SIZE and height <= PATCH_SIZE
    assert (decoded.pixels is not None) == acceptable, decoded.reason


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(names, st.binary(max_size=300)), min_size=1, max_size=12, unique_by=lambda f: f[0]))
def test_every_file_of_a_folder_is_a_patch_a_duplicate_or_a_problem(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("random")
    valid = io.BytesIO()
    Image.new("RGB", (50, 50), (200, 120, 180)).save(valid, format="PNG")
    paths = []
    for number, (name, data) in enumerate(files):
        path = folder / name
        try:
            path.write_bytes(valid.getvalue() if number % 2 else data)
        except OSError:  # a name the file system refuses (too long, say)
            continue
        paths.append(path)
    source = FileSource(paths, named_only=False, workers=1)
    patches = source.read_all()
    assert len(patches) + source.duplicates + len(source.problems) == len(paths)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 5, 7, 9]), st.floats(0.05, 0.95), st.integers(0, 2**32 - 1))
def test_tissue_mask_filters_match_pil_rank_filters(height, width, size, density, seed):
    from PIL import ImageFilter

    from histoscreen.data.wsi import square_filter

    mask = np.random.default_rng(seed).random((height, width)) < density
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    for pil_filter, combine in ((ImageFilter.MaxFilter, np.logical_or), (ImageFilter.MinFilter, np.logical_and)):
        assert np.array_equal(square_filter(mask, size, combine), np.asarray(image.filter(pil_filter(size))) > 0)


def test_tissue_filter_sizes_must_be_odd():
    import pytest

    from histoscreen.data.wsi import TissueSettings
    from histoscreen.errors import ArgumentError

    for size in (0, 4, -3):
        with pytest.raises(ArgumentError, match="hole_px must be an odd number"):
            TissueSettings(hole_px=size)
    assert TissueSettings(speck_px=3).speck_px == 3
