"""common.pixel_transforms: exact values on small arrays, and the header values of real DICOM test files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from common.pixel_transforms import (
    LookupTable,
    PixelHeader,
    apply_lut,
    apply_window,
    invert_monochrome1,
    rescale,
    scale_to_unit,
    stored_range,
    to_unit_intensity,
)


@pytest.fixture(scope="module")
def rg3_stored(dicom_dir) -> dict[str, np.ndarray]:
    """The CR extremity image (MONOCHROME1, 10 bits, window 550/1024) in its three lossless encodings."""
    return {name: pydicom.dcmread(dicom_dir / name).pixel_array for name in ("RG3_RLE", "RG3_JPLL", "RG3_J2KR.dcm")}


# ---------------------------------------------------------------- stored values and rescale


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [(8, False, (0, 255)), (10, False, (0, 1023)), (12, True, (-2048, 2047)), (16, False, (0, 65535)),
     (16, True, (-32768, 32767))],
)  # fmt: skip
def test_stored_range(bits, signed, expected):
    assert stored_range(bits, signed) == expected


def test_rescale_ct1_header_values(dicom_dir):
    ds = pydicom.dcmread(dicom_dir / "CT1_J2KI")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    assert rescale(np.array([-2315, 0, 1024, 2409], dtype=np.int16), slope, intercept).tolist() == [
        -3339.0, -1024.0, 0.0, 1385.0,
    ]  # fmt: skip
    hounsfield = rescale(ds.pixel_array, slope, intercept)
    assert (hounsfield.min(), hounsfield.max()) == (-3339.0, 1385.0)
    np.testing.assert_array_equal(hounsfield, apply_modality_lut(ds.pixel_array, ds))


def test_rescale_fractional_slope_mr2_values():
    out = rescale(np.array([0, 1, 600]), 3.774114, 0.000061)
    np.testing.assert_allclose(out, [0.000061, 3.774175, 2264.468461], rtol=0, atol=1e-9)


def test_ct1_pipeline_scales_over_rescaled_stored_range():
    """No window: [0, 1] spans the rescaled full signed 16-bit range, so stored 0 (-1024 HU) -> 32768/65535."""
    header = PixelHeader("MONOCHROME2", 16, signed=True, rescale_slope=1.0, rescale_intercept=-1024.0)
    out = to_unit_intensity(np.array([-32768, 0, 32767], dtype=np.int16), header)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.0, 32768 / 65535, 1.0], dtype=np.float32))


# ---------------------------------------------------------------- lookup tables


def test_lut_clamps_below_and_above():
    lut = LookupTable(first_mapped=10, data=np.array([5, 6, 7]), bits=8)
    assert apply_lut(np.array([0, 10, 11, 12, 13, 99]), lut).tolist() == [5, 5, 6, 7, 7, 7]


def test_lut_descriptor_rules():
    assert LookupTable.from_descriptor([0, 0, 16], np.arange(65536)).data.size == 65536  # 0 entries = 2**16
    assert LookupTable.from_descriptor([4096, 63488, 16], np.zeros(4096), signed_input=True).first_mapped == -2048
    assert LookupTable.from_descriptor([4, -2, 8], np.zeros(4), signed_input=False).first_mapped == 65534
    padded = LookupTable.from_descriptor([3, 0, 8], [1, 2, 3, 0])
    assert padded.data.tolist() == [1, 2, 3] and padded.output_range == (0, 255)
    assert LookupTable.from_descriptor([2, 0, 8], [0, 4095]).output_range == (0, 4095)  # data wider than declared
    with pytest.raises(ValueError, match="LUT Data has 2 entries, the descriptor says 3"):
        LookupTable.from_descriptor([3, 0, 16], [1, 2])


def test_modality_lut_sequence_mlut_18(dicom_dir):
    ds = pydicom.dcmread(dicom_dir / "mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    assert list(item.LUTDescriptor) == [4096, -2048, 16]
    lut = LookupTable.from_descriptor(item.LUTDescriptor, item.LUTData, signed_input=True)
    stored = np.array([-3000, -2048, -2047, -1, 0, 1, 2047, 3000], dtype=np.int16)
    assert apply_lut(stored, lut).tolist() == [0, 0, 16, 32759, 32776, 32792, 65535, 65535]
    image = ds.pixel_array
    np.testing.assert_array_equal(apply_lut(image, lut), apply_modality_lut(image, ds))
    header = PixelHeader("MONOCHROME2", 12, signed=True, modality_lut=lut)
    unit = to_unit_intensity(image, header)
    np.testing.assert_array_equal(unit, (apply_modality_lut(image, ds) / 65535).astype(np.float32))


def test_voi_lut_sequence_vlut_04(dicom_dir):
    ds = pydicom.dcmread(dicom_dir / "vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [256, 0, 16]
    lut = LookupTable.from_descriptor(item.LUTDescriptor, item.LUTData)
    assert apply_lut(np.array([0, 1, 127, 128, 191, 255], dtype=np.uint8), lut).tolist() == [
        0, 257, 32639, 32896, 49087, 65535,
    ]  # fmt: skip
    image = ds.pixel_array
    np.testing.assert_array_equal(apply_lut(image, lut), apply_voi_lut(image, ds))
    unit = to_unit_intensity(image, PixelHeader("MONOCHROME2", 8, voi_lut=lut))
    np.testing.assert_array_equal(unit, (apply_voi_lut(image, ds) / 65535).astype(np.float32))


def test_voi_lut_wins_over_window_and_follows_rescale():
    lut = LookupTable(first_mapped=-10, data=np.array([0, 100, 200, 400]), bits=10)
    header = PixelHeader(
        "MONOCHROME2", 8, rescale_slope=2.0, rescale_intercept=-12.0, voi_lut=lut, window_center=0, window_width=2
    )
    # stored 0, 1, 2, 3 -> modality -12, -10, -8, -6 -> LUT index clamp(0), 0, 2, 3 -> 0, 0, 200, 400 / 1023
    out = to_unit_intensity(np.array([0, 1, 2, 3], dtype=np.uint8), header)
    np.testing.assert_array_equal(out, np.array([0, 0, 200 / 1023, 400 / 1023], dtype=np.float32))


# ---------------------------------------------------------------- window


def test_window_linear_exact_values():
    # c=3, w=5: 0 for x <= 0.5, 1 for x > 4.5, else (x - 2.5) / 4 + 0.5
    out = apply_window(np.array([0, 0.5, 1, 2, 3, 4, 4.5, 5, 6]), 3, 5)
    assert out.tolist() == [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1, 1]


def test_window_width_one_is_a_step():
    assert apply_window(np.array([9, 9.5, 9.6, 10, 11]), 10, 1).tolist() == [0, 0, 1, 1, 1]


def test_window_linear_exact_and_sigmoid():
    assert apply_window(np.arange(6), 2, 4, "LINEAR_EXACT").tolist() == [0, 0.25, 0.5, 0.75, 1, 1]
    np.testing.assert_allclose(
        apply_window(np.array([0, 1, -1]), 0, 4, "SIGMOID"), [0.5, 1 / (1 + np.exp(-1)), 1 / (1 + np.e)], rtol=1e-15
    )


@pytest.mark.parametrize(("width", "function"), [(0.5, "LINEAR"), (0, "LINEAR_EXACT"), (-1, "SIGMOID")])
def test_window_invalid_width(width, function):
    with pytest.raises(ValueError, match="WindowWidth"):
        apply_window(np.zeros(2), 0, width, function)


def test_window_mg1_header_values():
    """MG1's window 2047/4095 on 12-bit values: (x - 2046.5) / 4094 + 0.5 = (x + 0.5) / 4094, clipped."""
    out = apply_window(np.array([0, 2047, 4093, 4094, 4095]), 2047, 4095)
    np.testing.assert_allclose(out, [0.5 / 4094, 2047.5 / 4094, 4093.5 / 4094, 1, 1], rtol=1e-12)


def test_window_matches_pydicom_on_rg3(dicom_dir, rg3_stored):
    ds = pydicom.dcmread(dicom_dir / "RG3_RLE")
    stored = rg3_stored["RG3_RLE"]
    expected = apply_windowing(stored, ds) / 1023  # pydicom's output range is that of 10 stored bits
    np.testing.assert_allclose(apply_window(stored, 550, 1024), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- MONOCHROME1, scaling, pipeline


def test_rg3_lossless_encodings_decode_identically(rg3_stored):
    rle = rg3_stored["RG3_RLE"]
    assert rle.shape == (1760, 1760) and (rle.min(), rle.max()) == (0, 1023)
    np.testing.assert_array_equal(rle, rg3_stored["RG3_JPLL"])
    np.testing.assert_array_equal(rle, rg3_stored["RG3_J2KR.dcm"])


def test_monochrome1_inversion_on_rg3(rg3_stored):
    stored = rg3_stored["RG3_RLE"]
    mono1 = PixelHeader("MONOCHROME1", 10, window_center=550, window_width=1024)
    mono2 = PixelHeader("MONOCHROME2", 10, window_center=550, window_width=1024)
    inverted, plain = to_unit_intensity(stored, mono1), to_unit_intensity(stored, mono2)
    assert inverted.dtype == np.float32 and inverted.shape == (1760, 1760)
    np.testing.assert_allclose(inverted + plain, 1.0, rtol=0, atol=1e-7)
    # stored 0 is displayed white in MONOCHROME1 -> 1.0; stored 1023 -> 1 - ((1023 - 549.5) / 1023 + 0.5)
    assert inverted[stored == 0].min() == 1.0
    np.testing.assert_allclose(inverted[stored == 1023], np.float32(1 - (473.5 / 1023 + 0.5)), rtol=1e-6)


def test_invert_and_scale_small_arrays():
    assert invert_monochrome1(np.array([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]
    np.testing.assert_array_equal(
        scale_to_unit(np.array([-5, 0, 2048, 4095, 5000]), 0, 4095),
        np.array([0, 0, 2048 / 4095, 1, 1], dtype=np.float32),
    )


def test_eight_bit_and_stray_high_bits():
    assert to_unit_intensity(np.array([0, 51, 255], dtype=np.uint8), PixelHeader("MONOCHROME2", 8)).tolist() == [
        0.0, np.float32(0.2), 1.0,
    ]  # fmt: skip
    # 12 bits stored in 16: a value above 4095 is clipped to the stored range first
    out = to_unit_intensity(np.array([0, 4095, 5000], dtype=np.uint16), PixelHeader("MONOCHROME2", 12))
    assert out.tolist() == [0.0, 1.0, 1.0]


def test_signed_rescale_window_monochrome1_order():
    """Signed stored -> rescale -> window -> inversion, in that order."""
    header = PixelHeader(
        "MONOCHROME1", 12, signed=True, rescale_slope=2.0, rescale_intercept=100.0, window_center=100.5,
        window_width=9.0,
    )  # fmt: skip
    # stored -3, -1, 0, 1, 3 -> 94, 98, 100, 102, 106 -> window(c=100.5,w=9): (x - 100) / 8 + 0.5 clipped
    out = to_unit_intensity(np.array([-3, -1, 0, 1, 3], dtype=np.int16), header)
    np.testing.assert_allclose(out, 1 - np.array([0, 0.25, 0.5, 0.75, 1]), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"photometric": "RGB"}, "not a grayscale image"),
        ({"bits_stored": 17}, "BitsStored 17"),
        ({"rescale_slope": 0.0}, "RescaleSlope 0"),
        ({"window_center": 10.0}, "both center and width"),
        ({"window_center": 10.0, "window_width": 0.0}, "WindowWidth 0.0"),
        ({"voi_function": "LOG"}, "VOILUTFunction LOG"),
    ],
)
def test_header_validation(kwargs, message):
    values = {"photometric": "MONOCHROME2", "bits_stored": 12, **kwargs}
    with pytest.raises(ValueError, match=message):
        PixelHeader(**values)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 16),
    signed=st.booleans(),
    slope=st.sampled_from([1.0, 0.5, 3.774114, -1.0]),
    intercept=st.sampled_from([0.0, -1024.0, 7.5]),
    window=st.one_of(st.none(), st.tuples(st.floats(-5000, 5000), st.floats(1, 70000))),
    monochrome1=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_output_is_float32_unit_range(bits, signed, slope, intercept, window, monochrome1, seed):
    low, high = stored_range(bits, signed)
    stored = np.random.default_rng(seed).integers(low, high, size=(3, 5), endpoint=True)
    center, width = window if window else (None, None)
    header = PixelHeader(
        "MONOCHROME1" if monochrome1 else "MONOCHROME2", bits, signed=signed, rescale_slope=slope,
        rescale_intercept=intercept, window_center=center, window_width=width,
    )  # fmt: skip
    out = to_unit_intensity(stored, header)
    assert out.dtype == np.float32 and out.shape == (3, 5)
    assert out.min() >= 0.0 and out.max() <= 1.0
