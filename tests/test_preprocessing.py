"""Preprocessing: invariants on synthetic breasts (hypothesis) and checks on real mini-MIAS images."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from common.preprocessing import Geometry, PreprocessConfig, otsu_level, preprocess, segment_breast, side_from_mask
from common.records import LesionCircle

SWAP = {"left": "right", "right": "left"}
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def synthetic_breast(h, w, side, depth, half_height, centre, tissue, noise, seed, label):
    """A half-ellipse of tissue against the ``side`` edge, noisy dark background, optional bright film label."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:h, 0:w]
    from_wall = cols if side == "left" else (w - 1) - cols
    cy = centre * (h - 1)
    inside = (from_wall / depth) ** 2 + ((rows - cy) / half_height) ** 2 <= 1.0
    image = rng.uniform(0.0, noise, size=(h, w))
    image[inside] = np.clip(tissue + rng.uniform(-0.1, 0.1, size=int(inside.sum())), 0.0, 1.0)
    if label:  # a small bright square in the far top corner, clear of the breast
        s = max(2, min(h, w) // 10)
        c0 = w - 2 - s if side == "left" else 1
        box = (slice(1, 1 + s), slice(c0, c0 + s))
        grown = ndimage.binary_dilation(inside, iterations=2)
        if not grown[box].any():
            image[box] = 1.0
    return image.astype(np.float32), inside


@st.composite
def breasts(draw, max_side=96):
    h = draw(st.integers(24, max_side))
    w = draw(st.integers(24, max_side))
    side = draw(st.sampled_from(["left", "right"]))
    half_height = draw(st.floats(0.25, 0.45)) * h
    lo, hi = (half_height + 1) / (h - 1), 1 - (half_height + 1) / (h - 1)
    params = dict(
        h=h,
        w=w,
        side=side,
        depth=draw(st.floats(0.35, 0.75)) * w,
        half_height=half_height,
        centre=draw(st.floats(min(lo, 0.5), max(hi, 0.5))),
        tissue=draw(st.floats(0.35, 0.7)),
        noise=draw(st.floats(0.0, 0.05)),
        seed=draw(st.integers(0, 2**32 - 1)),
        label=draw(st.booleans()),
    )
    image, inside = synthetic_breast(**params)
    return image, side, inside, params


sizes = st.integers(8, 64)


def configs(size):
    return PreprocessConfig(size=size)


# ------------------------------------------------------------------------------------------------ properties


@PROPERTY
@given(case=breasts(), size=sizes, give_side=st.booleans())
def test_output_shape_dtype_range_and_zero_padding(case, size, give_side):
    image, side, _, _ = case
    out = preprocess(image, breast_side=side if give_side else None, config=configs(size))
    g = out.geometry
    assert out.image.shape == (size, size) and out.image.dtype == np.float32
    assert out.breast_mask.shape == (size, size) and out.breast_mask.dtype == np.bool_
    assert out.image.min() >= 0.0 and out.image.max() <= 1.0
    assert not out.image[~out.breast_mask].any(), "pixels outside the breast mask must be exactly 0"
    # the crop fills one dimension, the rest is zero padding: right of the breast, above and below it
    assert g.out_height == size or g.out_width == size
    assert g.pad_top == (size - g.out_height) // 2
    band = np.zeros((size, size), dtype=bool)
    band[g.pad_top : g.pad_top + g.out_height, : g.out_width] = True
    assert not out.image[~band].any() and not out.breast_mask[~band].any()
    assert out.breast_side == side


@PROPERTY
@given(case=breasts(), size=sizes, give_side=st.booleans())
def test_mirrored_input_with_swapped_side_gives_identical_output(case, size, give_side):
    image, side, _, _ = case
    config = configs(size)
    a = preprocess(image, breast_side=side if give_side else None, config=config)
    b = preprocess(image[:, ::-1], breast_side=SWAP[side] if give_side else None, config=config)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.breast_mask, b.breast_mask)
    assert a.breast_side == SWAP[b.breast_side]
    w = image.shape[1]
    mirrored = replace(a.geometry, left=w - a.geometry.left - a.geometry.width, flipped=not a.geometry.flipped)
    assert b.geometry == mirrored
    for x, y in [(a.geometry.left, a.geometry.top), (3.25, 7.5), (w - 1, 0)]:
        assert b.geometry.map_point(w - 1 - x, y) == pytest.approx(a.geometry.map_point(x, y), abs=1e-9)


@PROPERTY
@given(case=breasts(), size=st.integers(24, 96), data=st.data())
def test_mapped_lesion_circle_lands_on_the_drawn_blob(case, size, data):
    image, side, inside, params = case
    # a bright disc well inside the breast
    core = ndimage.binary_erosion(inside, iterations=4)
    assume(core.sum() > 20)
    ys, xs = np.nonzero(core)
    i = data.draw(st.integers(0, len(xs) - 1))
    cx, cy = float(xs[i]), float(ys[i])
    room = ndimage.distance_transform_edt(np.pad(inside, 1))[ys[i] + 1, xs[i] + 1]  # image edge counts as outside
    r = data.draw(st.floats(2.5, max(2.5, room - 1.5)))
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    disc = (cols - cx) ** 2 + (rows - cy) ** 2 <= r**2
    assume((disc & ~inside).sum() == 0)
    drawn = image.copy()
    drawn[disc] = 1.0
    out = preprocess(drawn, breast_side=side, config=configs(size))
    circle = out.geometry.map_circle(LesionCircle(x=cx, y=cy, r=r))
    assume(circle.r >= 2.5)  # a blob of at least ~5 output pixels across
    assert circle.r == pytest.approx(r * out.geometry.scale_x, rel=0.1)
    bright = out.image > (params["tissue"] + 0.1 + 1.0) / 2
    labels, _ = ndimage.label(bright)
    hit = labels[int(round(circle.y)), int(round(circle.x))]
    assert hit > 0, "the mapped centre must fall on the bright blob"
    blob = labels == hit
    by, bx = ndimage.center_of_mass(blob)
    assert abs(bx - circle.x) <= 0.75 and abs(by - circle.y) <= 0.75
    mapped = out.geometry.map_mask(disc)
    iou = (mapped & blob).sum() / (mapped | blob).sum()
    assert iou > 0.6


@PROPERTY
@given(case=breasts(), size=sizes)
def test_breast_mask_is_the_mapped_segmentation_and_touches_the_left_edge(case, size):
    image, side, _, _ = case
    config = configs(size)
    out = preprocess(image, breast_side=side, config=config)
    assert np.array_equal(out.geometry.map_mask(segment_breast(image, config)), out.breast_mask)
    assert out.breast_mask[:, 0].any(), "chest wall must lie on the left edge"


@PROPERTY
@given(case=breasts(max_side=64), size=st.integers(16, 64))
def test_second_pass_changes_little(case, size):
    """The output is already canonical: preprocessing it again keeps the mask and pixels almost unchanged."""
    image, side, _, _ = case
    config = configs(size)
    once = preprocess(image, breast_side=side, config=config)
    twice = preprocess(once.image, breast_side="left", config=config)
    union = (once.breast_mask | twice.breast_mask).sum()
    assert (once.breast_mask & twice.breast_mask).sum() / union >= 0.85
    assert np.abs(once.image - twice.image).mean() <= 0.05
    assert twice.geometry.flipped is False and twice.geometry.left == 0


@PROPERTY
@given(case=breasts(), size=sizes)
def test_deterministic_and_independent_of_dtype_and_memory_layout(case, size):
    image, side, _, _ = case
    config = configs(size)
    as_uint8 = np.rint(image * 255).astype(np.uint8)
    reference = preprocess(as_uint8, breast_side=side, config=config)
    again = preprocess(as_uint8.copy(), breast_side=side, config=config)
    fortran = preprocess(np.asfortranarray(as_uint8.astype(np.float64) / 255), breast_side=side, config=config)
    assert np.array_equal(reference.image, again.image)
    assert np.allclose(reference.image, fortran.image, atol=1e-6)
    assert np.array_equal(reference.breast_mask, fortran.breast_mask)
    assert reference.geometry == fortran.geometry


@PROPERTY
@given(case=breasts(), size=sizes)
def test_film_label_and_background_fall_outside_the_mask(case, size):
    image, side, inside, params = case
    mask = segment_breast(image, configs(size))
    assume(params["label"] and (image == 1.0).sum() > 0)
    assert not mask[(image == 1.0) & ~inside].any()
    assert side_from_mask(mask) == side
    # the mask is the breast: at most a one-pixel rim of noise beyond the drawn ellipse
    assert not (mask & ~ndimage.binary_dilation(inside, structure=np.ones((3, 3)), iterations=2)).any()


# ------------------------------------------------------------------------------------------------ exact facts


def test_geometry_of_a_hand_made_case():
    image = np.zeros((40, 100), dtype=np.float32)
    image[10:30, 60:100] = 0.5  # breast on the right: rows 10..29, columns 60..99
    out = preprocess(image, breast_side=None, config=PreprocessConfig(size=20))
    g = out.geometry
    assert (g.top, g.left, g.height, g.width, g.flipped) == (10, 60, 20, 40, True)
    assert (g.out_height, g.out_width, g.pad_top) == (10, 20, 5)
    assert out.breast_side == "right"
    assert out.breast_mask.sum() == 200 and out.breast_mask[5:15, :].all()
    assert np.allclose(out.image[5:15, :], 0.5) and not out.image[:5].any() and not out.image[15:].any()
    # the chest-wall column (x = 99) maps to the left edge, the crop's outer corner to the far right
    assert g.map_point(99, 10) == pytest.approx((-0.25, 4.75))
    assert g.map_point(60, 29) == pytest.approx((19.25, 14.25))
    assert g.map_circle(LesionCircle(x=79.5, y=19.5, r=4.0)) == LesionCircle(x=9.5, y=9.5, r=2.0)
    assert Geometry.from_dict(g.to_dict()) == g


def test_blank_image_gives_zeros_without_error():
    out = preprocess(np.zeros((30, 50)), breast_side=None, config=PreprocessConfig(size=16))
    assert out.image.shape == (16, 16) and not out.image.any() and not out.breast_mask.any()


def test_bad_inputs_are_refused():
    config = PreprocessConfig(size=16)
    with pytest.raises(ValueError, match="breast_side"):
        preprocess(np.zeros((8, 8)), breast_side="up", config=config)
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((8, 8, 3)), breast_side=None, config=config)
    with pytest.raises(ValueError, match="NaN"):
        preprocess(np.full((8, 8), np.nan), breast_side=None, config=config)
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig(size=0)
    with pytest.raises(ValueError, match="original shape"):
        preprocess(np.ones((8, 8)), breast_side=None, config=config).geometry.map_mask(np.ones((9, 8), bool))


def test_otsu_level_splits_two_clusters():
    hist = np.zeros(256)
    hist[10] = 700
    hist[200] = 300
    assert otsu_level(hist) == 104.5  # middle of the empty gap 10..199
    single = np.zeros(256)
    single[42] = 5
    assert otsu_level(single) == 42.0
    assert otsu_level(np.zeros(256)) == 0.0


def test_fingerprint_is_stable_across_processes_and_tracks_every_field():
    code = "from common.preprocessing import PreprocessConfig as C; print(C().fingerprint())"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {PreprocessConfig().fingerprint()}
    variants = [PreprocessConfig(size=256), PreprocessConfig(threshold_factor=0.5), PreprocessConfig(levels=1024),
                PreprocessConfig(min_threshold=0.03), PreprocessConfig(opening_radius=0.01),
                PreprocessConfig(antialias=False)]
    prints = {c.fingerprint() for c in variants} | {PreprocessConfig().fingerprint()}
    assert len(prints) == len(variants) + 1


# ------------------------------------------------------------------------------------------------ real images

# film labels and film-edge strips measured on the originals: (refnum, rows, cols)
FILM_MARKS = [
    (2, (93, 236), (719, 810)),  # "R ML" label
    (12, (0, 117), (557, 658)),  # label at the top
    (12, (0, 1024), (744, 837)),  # bright film-edge strip, full height
    (20, (10, 157), (728, 828)),  # label
]


def _mias(mias_dir, refnum):
    return np.asarray(Image.open(mias_dir / f"mdb{refnum:03d}.png").convert("L"))


def _parity_side(refnum):
    return "right" if refnum % 2 else "left"  # data README: odd refnums show the breast on the right


@pytest.fixture(scope="module")
def mias_outputs(mias_dir):
    config = PreprocessConfig()
    cache = {}

    def get(refnum, side="parity"):
        key = (refnum, side)
        if key not in cache:
            given_side = _parity_side(refnum) if side == "parity" else None
            cache[key] = preprocess(_mias(mias_dir, refnum), breast_side=given_side, config=config)
        return cache[key]

    return get


@pytest.mark.parametrize("refnum", [1, 2, 12, 20, 28, 151])
def test_real_breast_lies_on_the_left_against_the_edge(mias_outputs, refnum):
    out = mias_outputs(refnum)
    mask = out.breast_mask
    assert out.image.shape == (512, 512) and out.image.dtype == np.float32
    rows = mask.any(axis=1).sum()
    assert mask[:, 0].sum() >= 0.5 * rows, "chest wall must run along the left edge"
    assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
    if refnum != 151:  # mdb151 fills the whole film: both halves are breast
        assert mask[:, :256].sum() > 1.2 * mask[:, 256:].sum(), "more breast in the left half"


@pytest.mark.parametrize("refnum", [1, 2, 12, 20, 28])
def test_side_found_from_the_mask_matches_the_data_set_convention(mias_outputs, refnum):
    assert mias_outputs(refnum, side=None).breast_side == _parity_side(refnum)


@pytest.mark.parametrize(("refnum", "rows", "cols"), FILM_MARKS)
def test_real_film_labels_are_removed(mias_dir, mias_outputs, refnum, rows, cols):
    original = _mias(mias_dir, refnum)[rows[0] : rows[1], cols[0] : cols[1]]
    assert (original > 180).mean() > 0.3, "the film mark is really there"
    out = mias_outputs(refnum)
    size = out.image.shape[0]
    for y in np.linspace(rows[0], rows[1] - 1, 6):
        for x in np.linspace(cols[0], cols[1] - 1, 6):
            if original[int(y) - rows[0], int(x) - cols[0]] <= 180:
                continue
            ox, oy = (int(round(v)) for v in out.geometry.map_point(x, y))
            if 0 <= ox < size and 0 <= oy < size:
                assert not out.breast_mask[oy, ox] and out.image[oy, ox] == 0.0


@pytest.mark.parametrize(("refnum", "x", "y_from_bottom", "r"), [(1, 535, 425, 197), (28, 338, 314, 56)])
def test_real_lesion_circle_maps_onto_the_same_tissue(mias_dir, mias_outputs, refnum, x, y_from_bottom, r):
    pixels = _mias(mias_dir, refnum).astype(np.float32) / 255
    out = mias_outputs(refnum)
    lesion = LesionCircle(x=x, y=1023 - y_from_bottom, r=r)  # Info.txt origin is bottom-left
    mapped = out.geometry.map_circle(lesion)
    assert out.breast_mask[int(round(mapped.y)), int(round(mapped.x))]
    assert mapped.r == pytest.approx(r * out.geometry.scale_x, rel=0.01)
    # the mean intensity over the lesion's inner disc agrees between the original and the output
    def disc_mean(image, c, radius):
        rr, cc = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        return image[(cc - c.x) ** 2 + (rr - c.y) ** 2 <= radius**2].mean()

    before = disc_mean(pixels, lesion, 0.5 * lesion.r)
    after = disc_mean(out.image, mapped, 0.5 * mapped.r)
    assert after == pytest.approx(before, abs=0.02)
