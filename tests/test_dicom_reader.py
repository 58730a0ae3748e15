"""client.readers.dicom on the 15 real files of ../shared/data/dicom and on small synthetic DICOMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from client.readers.base import DecodedImage, UnreadableImage
from client.readers.dicom import read_dicom
from client.readers.jpeg_sos import repair_sequential_scan

MAMMOGRAMS = {  # file -> (shape, bits stored, laterality, view, breast side); INVENTORY.md "read"
    "MG1_J2KI": ((4664, 3064), 12, "L", "MLO", "left"),
    "MG1_JPLY": ((4664, 3064), 12, "L", "MLO", "left"),
    "1-282.dcm": ((4688, 2592), 16, "R", "CC", None),
    "1-281.dcm": ((4680, 2576), 16, "L", "MLO", None),
}
NOT_BREAST = {  # file -> reason; INVENTORY.md "skipped: not a breast image"
    "RG1_J2KI.dcm": "not a breast image (Modality CR, BodyPartExamined CHEST)",
    "RG2_JPLY": "not a breast image (Modality CR, BodyPartExamined HIP)",
    "RG3_J2KR.dcm": "not a breast image (Modality CR, BodyPartExamined EXTREMITY)",
    "RG3_JPLL": "not a breast image (Modality CR, BodyPartExamined EXTREMITY)",
    "RG3_RLE": "not a breast image (Modality CR, BodyPartExamined EXTREMITY)",
    "CT1_J2KI": "not a breast image (Modality CT, BodyPartExamined missing)",
    "MR2_J2KI.dcm": "not a breast image (Modality MR, BodyPartExamined missing)",
    "mlut_18.dcm": "not a breast image (Modality OT, BodyPartExamined missing)",
    "vlut_04.dcm": "not a breast image (Modality OT, BodyPartExamined missing)",
    "JPEGExtended_1s_1f_u_16_12.dcm": "not a breast image (Modality NM, BodyPartExamined WHOLE BODY)",
    "JPEGBaseline_1s_1f_u_08_08.dcm": "not a breast image (Modality OT, BodyPartExamined missing)",
}
DM_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


@pytest.fixture(scope="module")
def outcomes(dicom_dir) -> dict[str, DecodedImage | str]:
    """Every real file read once per module: the decoded image, or the refusal reason."""
    results: dict[str, DecodedImage | str] = {}
    for path in sorted(dicom_dir.iterdir()):
        if path.name in ("INVENTORY.md", "SHA256SUMS"):
            continue
        try:
            results[path.name] = read_dicom(path)
        except UnreadableImage as refusal:
            results[path.name] = refusal.reason
    return results


# ---------------------------------------------------------------- the real files


def test_every_real_file_is_read_or_refused(outcomes):
    assert sorted(outcomes) == sorted([*MAMMOGRAMS, *NOT_BREAST])


@pytest.mark.parametrize("name", sorted(NOT_BREAST))
def test_non_breast_files_refused_with_modality_and_body_part(outcomes, name):
    assert outcomes[name] == NOT_BREAST[name]


@pytest.mark.parametrize("name", sorted(MAMMOGRAMS))
def test_mammograms_read_with_laterality_view_and_side(outcomes, name):
    shape, bits, laterality, view, side = MAMMOGRAMS[name]
    image = outcomes[name]
    assert isinstance(image, DecodedImage), image
    assert image.pixels.shape == shape and image.pixels.dtype == np.float32
    assert (image.bits_stored, image.laterality, image.view, image.breast_side) == (bits, laterality, view, side)
    assert image.source_format == "dicom"
    assert 0.0 <= image.pixels.min() and image.pixels.max() == 1.0


@pytest.mark.parametrize("name", ["1-281.dcm", "1-282.dcm"])
def test_rle_decode_is_stored_over_full_16_bit_range(outcomes, dicom_dir, name):
    """No window, no rescale, 16 bits stored: pixels are exactly stored / 65535."""
    stored = pydicom.dcmread(dicom_dir / name).pixel_array
    assert (stored.min(), stored.max()) == (0, 65535)
    np.testing.assert_array_equal(outcomes[name].pixels, (stored / 65535).astype(np.float32))


def test_cbis_ddsm_breast_lies_where_expected(outcomes):
    """1-281 (L MLO) has the breast in the left half, 1-282 (R CC) in the right half: no flip on reading."""
    left_mlo, right_cc = outcomes["1-281.dcm"].pixels, outcomes["1-282.dcm"].pixels
    assert left_mlo[:, :1288].mean() > 10 * left_mlo[:, 1288:].mean()
    assert right_cc[:, 1296:].mean() > 10 * right_cc[:, :1296].mean()


def test_j2k_mammogram_window_applied(outcomes):
    """MG1_J2KI: stored 0..4095 through window 2047/4095 -> min (0 + 0.5) / 4094, max 1; breast on the left."""
    pixels = outcomes["MG1_J2KI"].pixels
    assert pixels.min() == np.float32(0.5 / 4094)
    assert pixels[:, :1532].mean() > 2 * pixels[:, 1532:].mean()  # PatientOrientation A\F -> breast_side left


def test_non_conformant_jpeg_matches_j2k_coding(outcomes):
    """MG1_JPLY (Se byte repaired) and MG1_J2KI are two lossy codings of one film: nearly the same pixels."""
    jply, j2k = outcomes["MG1_JPLY"].pixels, outcomes["MG1_J2KI"].pixels
    assert np.corrcoef(jply.ravel(), j2k.ravel())[0, 1] > 0.999
    assert np.abs(jply - j2k).mean() < 0.005  # INVENTORY: mean |diff| 13.3 of 4095


# ---------------------------------------------------------------- the JPEG scan header repair


def _first_frame(path: Path) -> bytes:
    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


@pytest.mark.parametrize("name", ["MG1_JPLY", "RG2_JPLY"])
def test_repair_changes_only_the_se_byte(dicom_dir, name):
    frame = _first_frame(dicom_dir / name)
    repaired = repair_sequential_scan(frame)
    assert repaired is not None and len(repaired) == len(frame)
    changed = [i for i, (a, b) in enumerate(zip(frame, repaired)) if a != b]
    assert len(changed) == 1 and (frame[changed[0]], repaired[changed[0]]) == (0, 63)
    sos = frame.index(b"\xff\xda")
    assert changed[0] == sos + 8  # FF DA, Ls(2), Ns=1, Cs, Td/Ta, Ss, >Se<


def test_repaired_rg2_decodes_like_gdcm(dicom_dir):
    """INVENTORY: python-gdcm decodes RG2_JPLY to 2140 x 1760, values 0..960; so does the repaired frame."""
    from libjpeg import decode

    pixels = decode(repair_sequential_scan(_first_frame(dicom_dir / "RG2_JPLY")))
    assert pixels.shape == (2140, 1760) and (pixels.min(), pixels.max()) == (0, 960)


@pytest.mark.parametrize("name", ["JPEGExtended_1s_1f_u_16_12.dcm", "JPEGBaseline_1s_1f_u_08_08.dcm"])
def test_conformant_jpeg_left_alone(dicom_dir, name):
    assert repair_sequential_scan(_first_frame(dicom_dir / name)) is None


def test_repair_ignores_non_jpeg_bytes():
    assert repair_sequential_scan(b"") is None
    assert repair_sequential_scan(b"\x00" * 64) is None
    assert repair_sequential_scan(b"\xff\xd8\xff") is None


# ---------------------------------------------------------------- synthetic files: what the real ones lack


def write_dicom(path: Path, stored: np.ndarray | None, **attributes) -> Path:
    """A small single-frame DICOM file; `attributes` override the defaults (None removes one)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    values = {
        "SOPClassUID": SecondaryCaptureImageStorage,
        "SOPInstanceUID": generate_uid(),
        "PatientName": "Doe^Jane",
        "PatientID": "Mass-Test_P_00001_LEFT_CC",
        "Modality": "MG",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        **attributes,
    }
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    if stored is not None:
        ds.Rows, ds.Columns = stored.shape
        dtype = {8: np.uint8, 16: np.int16 if ds.PixelRepresentation else np.uint16}[ds.BitsAllocated]
        ds.PixelData = stored.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.array([[0, 1024, 2048], [3072, 4095, 100]])


def test_uncompressed_mammogram_without_window(tmp_path):
    image = read_dicom(write_dicom(tmp_path / "a.dcm", RAMP))
    np.testing.assert_array_equal(image.pixels, (RAMP / 4095).astype(np.float32))
    assert (image.bits_stored, image.laterality, image.view, image.breast_side) == (12, None, None, None)


def test_monochrome1_mammogram_is_inverted(tmp_path):
    image = read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(image.pixels, 1 - RAMP / 4095, rtol=0, atol=1e-7)
    assert image.pixels[0, 0] == 1.0 and image.pixels[1, 1] == 0.0


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_on_breast_image(tmp_path, vr):
    """The VOI LUT Sequence wins over the window; LUT Data as US values or as OW bytes."""
    entries = [0, 1000, 30000, 65535]
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 1000, 16])
    item.add_new("LUTData", vr, entries if vr == "US" else np.array(entries, dtype="<u2").tobytes())
    stored = np.array([[0, 1000, 1001], [1002, 1003, 4095]])
    image = read_dicom(write_dicom(tmp_path / "voi.dcm", stored, VOILUTSequence=Sequence([item]),
                                   WindowCenter=2047, WindowWidth=4096))  # fmt: skip
    expected = np.array([[0, 0, 1000], [30000, 65535, 65535]]) / 65535
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))


def test_modality_lut_on_breast_image(tmp_path):
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [3, 0, 8])
    item.add_new("LUTData", "US", [255, 128, 0])
    image = read_dicom(write_dicom(tmp_path / "mlut.dcm", np.array([[0, 1, 2, 4095]]),
                                   ModalityLUTSequence=Sequence([item])))  # fmt: skip
    np.testing.assert_array_equal(image.pixels, np.array([[1, 128 / 255, 0, 0]], dtype=np.float32))


def test_eight_bit_mammogram(tmp_path):
    stored = np.array([[0, 51], [204, 255]])
    image = read_dicom(write_dicom(tmp_path / "b8.dcm", stored, BitsAllocated=8, BitsStored=8, HighBit=7))
    np.testing.assert_array_equal(image.pixels, np.array([[0, 0.2], [0.8, 1]], dtype=np.float32))
    assert image.bits_stored == 8


def test_signed_mammogram_with_rescale_and_window(tmp_path):
    stored = np.array([[-2048, -1], [0, 2047]])
    path = write_dicom(tmp_path / "s.dcm", stored, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=2048,
                       WindowCenter=2048, WindowWidth=4096)  # fmt: skip
    # rescaled 0, 2047, 2048, 4095 -> (x - 2047.5) / 4095 + 0.5
    expected = (np.array([[0, 2047], [2048, 4095]]) - 2047.5) / 4095 + 0.5
    np.testing.assert_allclose(read_dicom(path).pixels, expected, rtol=0, atol=1e-7)


def test_image_laterality_wins_over_laterality(tmp_path):
    path = write_dicom(tmp_path / "lat.dcm", RAMP, ImageLaterality="R", Laterality="L", ViewPosition="CC")
    image = read_dicom(path)
    assert (image.laterality, image.view) == ("R", "CC")


def test_digital_mammography_sop_class_is_breast_whatever_the_modality(tmp_path):
    path = write_dicom(tmp_path / "dm.dcm", RAMP, SOPClassUID=DM_FOR_PRESENTATION, Modality="DX",
                       ImageLaterality="L", ViewPosition="MLO", PatientOrientation=["P", "FL"])  # fmt: skip
    image = read_dicom(path)
    assert (image.laterality, image.view, image.breast_side) == ("L", "MLO", "right")


def test_dx_with_breast_region_code_is_breast(tmp_path):
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "80248007", "SCT", "Left breast"
    image = read_dicom(write_dicom(tmp_path / "dx.dcm", RAMP, Modality="DX", AnatomicRegionSequence=Sequence([region])))
    assert image.laterality == "L"


@pytest.mark.parametrize(
    ("code", "scheme", "expected"), [("399162004", "SCT", "CC"), ("R-10226", "SRT", "MLO"), ("399099002", "SCT", "LMO")]
)
def test_view_from_view_code_sequence(tmp_path, code, scheme, expected):
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, scheme, "view"
    image = read_dicom(write_dicom(tmp_path / "v.dcm", RAMP, ViewCodeSequence=Sequence([item])))
    assert image.view == expected


@pytest.mark.parametrize(
    ("description", "laterality", "view"),
    [("R MLO", "R", "MLO"), ("LCC tomo-synth", "L", "CC"), ("screening RIGHT XCCL", "R", "XCCL"),
     ("FULL FIELD", None, None)],
)  # fmt: skip
def test_laterality_and_view_from_series_description(tmp_path, description, laterality, view):
    image = read_dicom(write_dicom(tmp_path / "d.dcm", RAMP, SeriesDescription=description))
    assert (image.laterality, image.view) == (laterality, view)


def test_view_from_patient_orientation_and_view_position_first(tmp_path):
    cbis_like = read_dicom(write_dicom(tmp_path / "c.dcm", RAMP, Laterality="R", PatientOrientation="CC"))
    assert (cbis_like.laterality, cbis_like.view, cbis_like.breast_side) == ("R", "CC", None)
    both = read_dicom(write_dicom(tmp_path / "b.dcm", RAMP, ViewPosition="MLO", SeriesDescription="L CC"))
    assert (both.laterality, both.view) == ("L", "MLO")


def test_patient_identity_is_never_read(tmp_path):
    """The synthetic PatientID spells LEFT_CC: it must not be used, nor the name appear anywhere."""
    image = read_dicom(write_dicom(tmp_path / "p.dcm", RAMP))
    assert (image.laterality, image.view) == (None, None)
    assert "Doe" not in repr(image)
    with pytest.raises(UnreadableImage) as refusal:
        read_dicom(write_dicom(tmp_path / "q.dcm", RAMP, Modality="CR", BodyPartExamined="CHEST"))
    assert refusal.value.reason == "not a breast image (Modality CR, BodyPartExamined CHEST)"


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_bare_data_set_without_preamble(tmp_path, implicit_vr):
    ds = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", RAMP))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "bare", ds, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(read_dicom(tmp_path / "bare").pixels, (RAMP / 4095).astype(np.float32))


def test_rle_compressed_synthetic_round_trip(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(read_dicom(tmp_path / "rle.dcm").pixels, (RAMP / 4095).astype(np.float32))


# ---------------------------------------------------------------- refusals with specific reasons


def refusal(path: Path) -> str:
    with pytest.raises(UnreadableImage) as caught:
        read_dicom(path)
    return caught.value.reason


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert refusal(path) == "empty file (0 bytes)"


def test_non_dicom_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (tmp_path / "b.txt").write_bytes(b"hello")
    assert refusal(tmp_path / "a.png") == "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
    assert refusal(tmp_path / "b.txt") == "too short for a DICOM file (5 bytes)"
    assert refusal(tmp_path / "missing.dcm") == "cannot read file (No such file or directory)"


def test_truncated_uncompressed_pixel_data(tmp_path):
    data = write_dicom(tmp_path / "full.dcm", RAMP).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-5])
    assert refusal(tmp_path / "cut.dcm") == "truncated file: pixel data has 7 of 12 bytes"


def test_truncated_compressed_pixel_data(tmp_path, dicom_dir):
    data = (dicom_dir / "MG1_J2KI").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    expected = "truncated file: it ends before the end of an element of undefined length (compressed pixel data?)"
    assert refusal(tmp_path / "cut") == expected


@pytest.mark.parametrize(
    ("cut", "reason"),
    [(400, "truncated or corrupt file: a data element runs past the end of the file"),
     (777, "truncated or corrupt file: a data element runs past the end of the file"),
     (1111, "truncated file: it ends before the end of an element of undefined length (compressed pixel data?)")],
)  # fmt: skip
def test_truncated_header(tmp_path, dicom_dir, cut, reason):
    """Cuts inside header elements of a real mammogram (not at element boundaries), and just after them."""
    (tmp_path / "cut").write_bytes((dicom_dir / "1-282.dcm").read_bytes()[:cut])
    assert refusal(tmp_path / "cut") == reason


def test_corrupt_compressed_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[64:] = b"\x7f" * (len(frame) - 64)  # segment data after the 64-byte RLE header: runs too long
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "bad.dcm")
    assert refusal(tmp_path / "bad.dcm").startswith("pixel data could not be decoded (RLE Lossless): ")


def test_corrupt_header(tmp_path):
    data = bytearray(write_dicom(tmp_path / "ok.dcm", RAMP).read_bytes())
    assert data[128:138] == b"DICM\x02\x00\x00\x00UL"
    data[136:138] = b"XX"  # no such VR on the first file meta element
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    assert refusal(tmp_path / "bad.dcm") == "corrupt DICOM header (NotImplementedError)"


def test_length_beyond_end_of_file(tmp_path):
    data = bytearray(write_dicom(tmp_path / "ok.dcm", RAMP).read_bytes())
    rows = data.index(b"\x28\x00\x10\x00US")
    data[rows + 6 : rows + 8] = (3).to_bytes(2, "little")  # Rows declared 3 bytes long: the rest shifts
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    assert refusal(tmp_path / "bad.dcm") == "truncated or corrupt file: a data element runs past the end of the file"


def test_unknown_transfer_syntax(tmp_path):
    data = write_dicom(tmp_path / "ok.dcm", RAMP).read_bytes().replace(b"1.2.840.10008.1.2.1", b"1.2.840.99999.1.2.1")
    (tmp_path / "bad.dcm").write_bytes(data)
    assert refusal(tmp_path / "bad.dcm").startswith("pixel data could not be decoded (1.2.840.99999.1.2.1): ")


def test_no_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", None, Rows=2, Columns=3)
    assert refusal(path) == "no pixel data (not an image object, or a file cut short before its pixel data)"


def test_multi_frame_refused(tmp_path):
    stored = np.zeros((2, 2, 3))
    path = write_dicom(tmp_path / "mf.dcm", None, NumberOfFrames=2, Rows=2, Columns=3)
    ds = pydicom.dcmread(path)
    ds.add_new("PixelData", "OW", stored.astype(np.uint16).tobytes())
    ds.save_as(path)
    assert refusal(path) == "multi-frame image (2 frames, e.g. tomosynthesis): one 2-D mammogram per file"


def test_colour_image_refused(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", RAMP, PhotometricInterpretation="RGB")
    assert refusal(path) == "not a grayscale image (PhotometricInterpretation RGB)"


def test_corrupt_value_of_needed_attribute(tmp_path):
    path = write_dicom(tmp_path / "v.dcm", RAMP, BitsStored=[12, 12])
    assert refusal(path) == "unreadable header value (TypeError)"


def test_invalid_window_refused(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=100, WindowWidth=0)
    assert refusal(path) == "unusable pixel transform in header: WindowWidth 0.0 (>= 1 required for LINEAR)"
