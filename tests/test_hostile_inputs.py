"""Hostile files and manifests: each case measured against the readers becomes a per-file or per-row reason.

Cases (issue 13, "Hostile files crash the readers"): a decoder panic (a `BaseException`), a header declaring
65535 x 65535, NaN / infinite window and rescale values, a PGM width of 5,000 digits, manifest cells with a NUL
byte, a 5,000-character name or a 200 kB field, manifest paths outside the data folder, an indented Info.txt row.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid
from rle.rle import decode_frame, encode_frame
from test_check_data import run_cli, run_json
from test_dicom_reader import RAMP, write_dicom

from client.app import NodeFailure, _confined
from client.dataset_scan import decode_file, scan_folder
from client.readers.base import MAX_IMAGE_BYTES, UnreadableImage, is_decoder_panic
from client.readers.images import read_image
from client.readers.manifest import ManifestError, read_manifest
from client.readers.mias import MiasError, parse_info, read_mias_records
from client.readers.raster import read_raster

CORPUS = Path(__file__).parent / "fuzz_corpus"
RAMP16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 997).astype(np.uint16)


# ---------------------------------------------------------------- decoder panics
def panicking_rle_frame() -> bytes:
    """An 8 x 8 16-bit RLE frame whose second segment starts with a run byte 0x80: pylibjpeg-rle panics on it."""
    frame = bytearray(encode_frame(RAMP16.tobytes(), 8, 8, 1, 16, "<"))
    frame[64] = 0x80
    return bytes(frame)


def write_panicking_dicom(path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, generate_uid(), "MG"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = encapsulate([panicking_rle_frame()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def rust_panic() -> BaseException:
    try:
        decode_frame(panicking_rle_frame(), 64, 16, "<")
    except BaseException as error:  # noqa: BLE001 - the panic under test
        return error
    raise AssertionError("the RLE decoder no longer panics on this frame: pick another")


def test_the_panic_is_a_base_exception_recognised_by_type():
    panic = rust_panic()
    assert not isinstance(panic, Exception)
    assert (type(panic).__module__, type(panic).__name__) == ("pyo3_runtime", "PanicException")
    assert is_decoder_panic(panic)
    assert not any(is_decoder_panic(error) for error in (KeyboardInterrupt(), SystemExit(1), ValueError("x")))


def test_decoder_panic_is_a_reason(tmp_path):
    with pytest.raises(UnreadableImage) as caught:
        read_image(write_panicking_dicom(tmp_path / "panic.dcm"))
    assert caught.value.reason.startswith("pixel data could not be decoded (RLE Lossless): decoder panic (")


def test_scan_reports_panics_and_lets_interrupts_through(tmp_path):
    (tmp_path / "f").write_bytes(b"x")

    def panicking(path):
        raise rust_panic()

    def interrupted(path):
        raise KeyboardInterrupt

    assert decode_file(panicking, tmp_path / "f").startswith("internal reader error (decoder panic: index out of")
    with pytest.raises(KeyboardInterrupt):
        decode_file(interrupted, tmp_path / "f")


def test_node_error_wrapper_converts_a_panic_and_passes_interrupts():
    def handler(msg, context):
        raise rust_panic()

    with pytest.raises(NodeFailure, match=r"^PanicException during training; the details are in the hospital"):
        _confined("training")(handler)(None, None)

    def interrupted(msg, context):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _confined("training")(interrupted)(None, None)


def test_check_data_finishes_with_a_report_on_a_panicking_file(tmp_path):
    write_panicking_dicom(tmp_path / "panic.dcm")
    shutil.copy(CORPUS / "mammo_rle16.dcm.seed", tmp_path / "good.dcm")
    report = run_json(tmp_path)
    assert (report["n_files"], report["n_ok"], report["ok_files"]) == (2, 1, ["good.dcm"])
    [skipped] = report["skipped"]
    assert skipped["file"] == "panic.dcm" and "decoder panic" in skipped["reason"]


# ---------------------------------------------------------------- declared size
def test_header_declaring_65535_squared_is_refused_without_allocating(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", RAMP)
    data = path.read_bytes()
    rows_at = data.index(b"\x28\x00\x10\x00US\x02\x00")  # (0028,0010) Rows, explicit VR little endian
    columns_at = data.index(b"\x28\x00\x11\x00US\x02\x00")
    data = bytearray(data)
    data[rows_at + 8 : rows_at + 10] = data[columns_at + 8 : columns_at + 10] = (65535).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableImage) as caught:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.reason == (
        "header declares Rows 65535 x Columns 65535 x NumberOfFrames 1 at 2 byte(s) per sample = 8,589,672,450 "
        f"bytes, over the {MAX_IMAGE_BYTES:,}-byte limit (refused before decoding)"
    )
    assert peak < 20 * 2**20


def test_size_cap_is_configurable_to_the_byte(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", RAMP)  # 2 x 3 x 2 bytes = 12
    assert read_image(path, max_image_bytes=12).pixels.shape == (2, 3)
    with pytest.raises(UnreadableImage, match=r"= 12 bytes, over the 11-byte limit"):
        read_image(path, max_image_bytes=11)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width` x `height` 8-bit grayscale, with one tiny IDAT (CRCs right)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b"")


def test_png_and_pgm_headers_declaring_65535_squared(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_declaring(65535, 65535))
    (tmp_path / "huge.pgm").write_bytes(b"P5\n65535 65535\n255\n" + bytes(16))
    expected = "declares width 65535 x height 65535 at 1 byte(s) per sample = 4,294,836,225 bytes, over the"
    for name, what in (("huge.png", "PNG header"), ("huge.pgm", "PGM header")):
        with pytest.raises(UnreadableImage) as caught:
            read_raster(tmp_path / name)
        assert caught.value.reason.startswith(f"{what} {expected}")


def test_compressed_frame_declaring_another_size_is_refused(tmp_path):
    data = bytearray((CORPUS / "mammo_j2k16.dcm.seed").read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51")
    data[siz + 8 : siz + 16] = (65535).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    (tmp_path / "j2k.dcm").write_bytes(bytes(data))
    with pytest.raises(UnreadableImage) as caught:
        read_image(tmp_path / "j2k.dcm")
    assert caught.value.reason == (
        "compressed frame (JPEG 2000 Image Compression (Lossless Only)) declares 65535x65535 pixels, the header "
        "says 32x32 (refused before decoding)"
    )


def test_check_data_cap_option(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")  # 4,096 bytes
    assert run_json(tmp_path)["n_ok"] == 1
    report = run_json(tmp_path, "--max-image-mb", "0.001")  # 1,048 bytes
    assert report["n_ok"] == 0
    assert report["skipped"][0]["reason"].startswith("PNG header declares width 64 x height 64")


# ---------------------------------------------------------------- NaN and infinite values
@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"WindowCenter": "NaN", "WindowWidth": 4096}, "WindowCenter is nan (a finite number is required)"),
        ({"WindowCenter": 2048, "WindowWidth": "inf"}, "WindowWidth is inf (a finite number is required)"),
        ({"RescaleSlope": "inf"}, "RescaleSlope is inf (a finite number is required)"),
        ({"RescaleIntercept": "-inf"}, "RescaleIntercept is -inf (a finite number is required)"),
        ({"RescaleSlope": 1e308},
         "pixel values after the modality and VOI transforms: 5 of 6 pixel values are NaN or infinite"),
    ],
)
def test_non_finite_window_or_rescale_refused(tmp_path, attributes, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN / inf are not valid DS values, and writes them
        path = write_dicom(tmp_path / "nan.dcm", RAMP, **attributes)
    with pytest.raises(UnreadableImage) as caught:
        read_image(path)
    assert caught.value.reason == reason


def test_check_data_does_not_count_nan_images(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(tmp_path / "nan.dcm", RAMP, WindowCenter="NaN", WindowWidth=4096)
    report = scan_folder(tmp_path)
    assert (report.n_files, report.n_ok) == (1, 0)
    assert report.skipped[0].reason == "WindowCenter is nan (a finite number is required)"


# ---------------------------------------------------------------- PGM header numbers
def test_pgm_width_of_5000_digits(tmp_path):
    (tmp_path / "a.pgm").write_bytes(b"P5\n" + b"9" * 5000 + b" 8\n255\n" + bytes(64))
    with pytest.raises(UnreadableImage) as caught:
        read_image(tmp_path / "a.pgm")
    assert caught.value.reason == "corrupt PGM header: width has 5,000 digits (at most 9 accepted)"


# ---------------------------------------------------------------- manifests
@pytest.fixture
def hospital(tmp_path):
    folder = tmp_path / "hospital"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)
    return folder


def manifest_error(folder: Path, rows: list[str]) -> ManifestError:
    path = folder / "manifest.csv"
    path.write_text("file,label,patient_id\n" + "".join(row + "\n" for row in rows))
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert len(str(caught.value)) < 2000  # values are shortened, never echoed whole
    return caught.value


def manifest_problems(folder: Path, rows: list[str]) -> list[tuple[int, str, str]]:
    return [(problem.row, problem.field, problem.reason) for problem in manifest_error(folder, rows).problems]


def test_hostile_manifest_cells_are_row_problems(hospital):
    rows = ["a.png,benign,P1", "b\x00.png,benign,P2", "x" * 5000 + ".png,normal,P3",
            "b.png," + "m" * 200_000 + ",P4", "b.png,normal,P5\x00", "b.png,normal," + "p" * 300_000]
    assert manifest_problems(hospital, rows) == [
        (3, "file", "contains a NUL byte"),
        (4, "file", "5,004 characters (at most 1,024)"),
        (5, "row", "not CSV (field larger than field limit (131072))"),
        (6, "patient_id", "contains a NUL byte"),
        (7, "row", "not CSV (field larger than field limit (131072))"),
    ]
    values = [problem.value for problem in manifest_error(hospital, rows).problems]
    assert values == ["b\\0.png", "x" * 60 + "... (5,004 characters)", "", "P5\\0", ""]


def test_file_name_too_long_for_the_file_system(hospital):
    assert manifest_problems(hospital, ["y" * 300 + ".png,normal,P1"]) == [
        (2, "file", "path cannot be looked up (File name too long)")]


def test_manifest_paths_stay_inside_the_data_folder(hospital, tmp_path):
    (tmp_path / "outside.png").write_bytes((hospital / "a.png").read_bytes())
    (hospital / "link.png").symlink_to(tmp_path / "outside.png")
    rows = ["a.png,normal,P1", f"{tmp_path / 'outside.png'},normal,P2", "../outside.png,normal,P3",
            "sub/../../outside.png,benign,P4", "link.png,normal,P5", "/etc/passwd,normal,P6"]
    assert manifest_problems(hospital, rows) == [
        (3, "file", "absolute path (paths are relative to the manifest's folder)"),
        (4, "file", "path leads outside the data folder"),
        (5, "file", "path leads outside the data folder"),
        (6, "file", "path leads outside the data folder"),
        (7, "file", "absolute path (paths are relative to the manifest's folder)"),
    ]


def test_manifest_elsewhere_is_confined_to_the_scanned_folder(hospital, tmp_path):
    manifest = tmp_path / "manifest.csv"  # beside the folder: its rows may still only name files inside it
    manifest.write_text("file,label,patient_id\nhospital/a.png,normal,P1\nhospital/../outside.png,normal,P2\n")
    with pytest.raises(ManifestError) as caught:
        scan_folder(hospital, manifest)
    assert [(p.row, p.reason) for p in caught.value.problems] == [(3, "path leads outside the data folder")]


def test_check_data_lists_hostile_rows_and_exits_2(hospital):
    (hospital / "manifest.csv").write_text(
        "file,label,patient_id\na.png,normal,P1\n../../etc/passwd,normal,P2\nb\x00.png,benign,P3\n")
    result = run_cli(hospital, "--manifest", hospital / "manifest.csv")
    assert result.returncode == 2
    assert "row 3, file='../../etc/passwd': path leads outside the data folder" in result.stderr
    assert "row 4, file='b\\\\0.png': contains a NUL byte" in result.stderr


# ---------------------------------------------------------------- mini-MIAS Info.txt
def mias_copy(mias_dir: Path, folder: Path, edit) -> Path:
    """`folder` with an edited copy of Info.txt and an empty stand-in file per image (records read no pixels)."""
    folder.mkdir()
    lines = (mias_dir / "Info.txt").read_bytes().decode("latin-1").splitlines(keepends=True)
    (folder / "Info.txt").write_bytes("".join(edit(lines)).encode("latin-1"))
    for image in mias_dir.glob("mdb*.png"):
        (folder / image.name).touch()
    return folder


def test_info_row_with_a_leading_space_still_counts(mias_dir, tmp_path):
    def indent_mdb144_malignant_row(lines):
        assert lines[249].startswith("mdb144 F MISC M ")
        lines[249] = " " + lines[249]
        return lines

    folder = mias_copy(mias_dir, tmp_path / "mias", indent_mdb144_malignant_row)
    records = {record.path.stem: record for record in read_mias_records(folder)}
    assert Counter(r.label for r in records.values()) == {"normal": 207, "benign": 63, "malignant": 52}
    assert records["mdb144"].label == "malignant" and len(records["mdb144"].lesions) == 2
    assert [row.line for row in parse_info((folder / "Info.txt").read_text("latin-1")) if row.refnum == "mdb144"] \
        == [249, 250]


def test_info_rows_that_do_not_parse_are_reported_with_line_numbers(mias_dir, tmp_path):
    def break_rows(lines):
        lines[249] = "x" + lines[249]  # no longer starts with mdb
        assert lines[250].startswith("mdb145 D ")
        lines[250] = "\t" + lines[250].replace(" D ", " Q ", 1)  # indented, bad background
        return lines

    folder = mias_copy(mias_dir, tmp_path / "mias", break_rows)
    with pytest.raises(MiasError) as caught:
        read_mias_records(folder)
    assert caught.value.problems == (
        "line 250: mentions 'mdb144' but does not start with it (a table row is REFNUM BG CLASS "
        "[SEVERITY [X Y RADIUS]])",
        "line 251, field BG: 'Q' is not one of F, G, D",
    )
    result = run_cli(folder, "--json")
    assert result.returncode == 2 and "line 250: mentions 'mdb144'" in result.stderr


def test_info_coordinate_of_5000_digits(tmp_path):
    with pytest.raises(MiasError) as caught:
        parse_info("mdb001 G CIRC B " + "9" * 5000 + " 1 2\n")
    assert caught.value.problems == ("line 1, field X: '99999999999999999999...' is not a whole number",)


def test_reasons_never_hold_pixel_values(tmp_path):
    """A reason names fields and counts; the NaN case counts pixels without listing them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(tmp_path / "nan.dcm", RAMP * 0 + 1234, WindowCenter="NaN", WindowWidth=4096)
    report = json.loads(scan_folder(tmp_path).to_json())
    assert "1234" not in json.dumps(report["skipped"])
