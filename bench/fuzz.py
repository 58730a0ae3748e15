"""Hostile inputs: mutated files and configs fed to every reader and config parser; uncaught exceptions counted.

`python -m bench.fuzz --inputs 100000` mutates the seeds of `tests/fuzz_corpus/` (small files written by
`write_corpus`, see `--write-corpus`) and, when `../shared/data/dicom` is there, the headers of the real DICOM files
(read at run time, never copied), then feeds each input to its reader:

| kind | reader | may raise |
|---|---|---|
| dicom, png, pgm | `client.readers.images.read_image` | `UnreadableImage` |
| info | `client.readers.mias.read_mias_records` on a folder holding the mutated `Info.txt` | `MiasError` |
| manifest | `client.readers.manifest.read_manifest` (files checked, paths confined to the folder) | `ManifestError` |
| run-config | `RunConfig.parse_assignments` then `RunConfig.from_flower` on `key=value` lines | `ConfigError` |
| node-config | `NodeConfig.from_flower` on typed `key=value` lines | `ConfigError` |

Anything else escaping (including a `BaseException` such as a decoder panic, but not KeyboardInterrupt) is an
uncaught exception, counted by type in `bench/results/fuzz.json` with the first message of each type. A mutation
is 1-4 operations (`Mutation`): bit flip, byte set to an edge value, 16/32-bit field set to an edge value,
insertion of a hostile token (NUL, 5,000 digits, a 200 kB run, `../`, `nan`), deletion, duplication, truncation.
The address space is capped (`--memory-gb`) so that an allocation a header talks a decoder into is a MemoryError,
counted, not a dead machine. The tests run the same harness (`tests/test_fuzz_readers.py`) with hypothesis.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / "tests" / "fuzz_corpus"
SEED_SUFFIX = ".seed"
SHARED_DICOM = Path(os.environ.get("MAMMOFL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "dicom"
RESULTS = REPO_ROOT / "bench" / "results" / "fuzz.json"
_MEMORY_DISK = Path("/dev/shm")  # scratch files there when it exists: writing one per input to disk is the slow part

KINDS = ("dicom", "png", "pgm", "info", "manifest", "run-config", "node-config")
_WEIGHTS = (40, 14, 14, 10, 10, 6, 6)  # share of inputs per kind in the benchmark
_SUFFIXES = {".dcm": "dicom", ".png": "png", ".pgm": "pgm", ".info": "info", ".csv": "manifest",
             ".run": "run-config", ".node": "node-config"}
OPERATIONS = ("flip", "set", "int16", "int32", "insert", "delete", "duplicate", "truncate")
EDGE_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x0A, 0x2C, 0x22)
EDGE_INTS = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE)
TOKENS = (b"\x00", b"9" * 5000, b"A" * 200_000, b"../../", b"/etc/", b"nan", b"inf", b"-1", b"1e308", b'"',
          b"\n", b" ", b"\t", b",", b"=", b"mdb", b"\xff\xfe", b"#", b"P5", b"65535", b"\xe0\x7f\x10\x00")
MANIFEST_FILES = ("a.png", "b.pgm", "c.dcm", "sub/d.png")  # present (empty) in the manifest's folder
MIAS_FILES = tuple(f"mdb{n:03d}.png" for n in range(1, 9))  # present (empty) next to the Info.txt


@dataclass(frozen=True)
class Mutation:
    """One edit of a seed: `operation` at `position` (a fraction of the length), with `value` / `token`."""

    operation: str
    position: float
    value: int = 0
    token: bytes = b""

    def apply(self, data: bytes) -> bytes:
        at = min(int(self.position * len(data)), max(len(data) - 1, 0))
        if self.operation == "truncate":
            return data[:at]
        if not data and self.operation != "insert":
            return data
        if self.operation == "flip":
            return data[:at] + bytes([data[at] ^ (1 << (self.value % 8))]) + data[at + 1 :]
        if self.operation == "set":
            return data[:at] + bytes([EDGE_BYTES[self.value % len(EDGE_BYTES)]]) + data[at + 1 :]
        if self.operation in ("int16", "int32"):
            width = 2 if self.operation == "int16" else 4
            number = EDGE_INTS[self.value % len(EDGE_INTS)] & (2 ** (8 * width) - 1)
            return data[:at] + number.to_bytes(width, "little") + data[at + width :]
        if self.operation == "insert":
            return data[:at] + (self.token or TOKENS[self.value % len(TOKENS)]) + data[at:]
        if self.operation == "delete":
            return data[:at] + data[at + 1 + self.value % 64 :]
        if self.operation == "duplicate":
            chunk = data[at : at + 1 + self.value % 256]
            return data[:at] + chunk + data[at:]
        raise ValueError(f"unknown mutation {self.operation}")


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    for mutation in mutations:
        data = mutation.apply(data)
    return data


def random_mutations(rng: random.Random) -> list[Mutation]:
    return [
        Mutation(rng.choice(OPERATIONS), rng.random(), rng.randrange(1 << 16))
        for _ in range(rng.randint(1, 4))
    ]


# ---------------------------------------------------------------- seeds
def load_seeds(corpus: Path = CORPUS, shared_dicom: Path | None = SHARED_DICOM) -> dict[str, list[bytes]]:
    """Seed inputs per kind: the corpus files, plus real DICOM headers (with a small pixel data element of the
    corpus in the same transfer syntax family) when `shared_dicom` exists."""
    seeds: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
    for path in sorted(corpus.iterdir()):
        kind = _SUFFIXES.get(Path(path.name.removesuffix(SEED_SUFFIX)).suffix)
        if kind and path.name.endswith(SEED_SUFFIX):
            seeds[kind].append(path.read_bytes())
    if shared_dicom is not None and shared_dicom.is_dir():
        seeds["dicom"].extend(real_dicom_headers(shared_dicom, corpus))
    missing = [kind for kind, found in seeds.items() if not found]
    if missing:
        raise FileNotFoundError(f"{corpus}: no seed for {', '.join(missing)} (python -m bench.fuzz --write-corpus)")
    return seeds


def real_dicom_headers(folder: Path, corpus: Path = CORPUS) -> list[bytes]:
    """Each real file's bytes up to its Pixel Data element, followed by the Pixel Data element of the corpus
    file of the same kind of transfer syntax (native, RLE, JPEG, JPEG 2000): small inputs with real headers."""
    import pydicom

    pixel_elements = {name: _pixel_element((corpus / f"mammo_{name}.dcm{SEED_SUFFIX}").read_bytes())
                      for name in ("native16", "rle16", "jpeg8", "j2k16")}
    headers = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in ("", ".dcm") or not path.is_file():
            continue
        data = path.read_bytes()
        start = data.rfind(b"\xe0\x7f\x10\x00", 0, len(data) - 12)
        try:
            syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - a file that is not a DICOM file is simply not a seed
            continue
        if start < 0 or not syntax:
            continue
        family = ("rle16" if syntax == "1.2.840.10008.1.2.5" else "j2k16" if syntax.name.startswith("JPEG 2000")
                  else "jpeg8" if syntax.is_encapsulated else "native16")
        headers.append(data[:start] + pixel_elements[family])
    return headers


def _pixel_element(data: bytes) -> bytes:
    return data[data.rfind(b"\xe0\x7f\x10\x00") :]


# ---------------------------------------------------------------- feeding one input
class Workspace:
    """A scratch folder with the fixed files the text readers look up (created once, reused per input)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.image = self.root / "input"
        self.manifest_dir = self.root / "hospital"
        self.mias_dir = self.root / "mini-mias"
        for name in MANIFEST_FILES:
            (self.manifest_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.manifest_dir / name).touch()
        self.mias_dir.mkdir(exist_ok=True)
        for name in MIAS_FILES:
            (self.mias_dir / name).touch()


def feed(kind: str, data: bytes, workspace: Workspace) -> str:
    """Give `data` to the reader of `kind`: "ok" or "refused" (the reader's own error type); anything else raises."""
    from client.readers.base import UnreadableImage
    from client.readers.images import read_image
    from client.readers.manifest import ManifestError, read_manifest
    from client.readers.mias import INFO_FILE, MiasError, read_mias_records
    from common.run_config import ConfigError, NodeConfig, RunConfig

    try:
        if kind in ("dicom", "png", "pgm"):
            workspace.image.write_bytes(data)
            read_image(workspace.image)
        elif kind == "info":
            (workspace.mias_dir / INFO_FILE).write_bytes(data)
            read_mias_records(workspace.mias_dir, require_images=False)
        elif kind == "manifest":
            manifest = workspace.manifest_dir / "manifest.csv"
            manifest.write_bytes(data)
            read_manifest(manifest, root=workspace.manifest_dir)
        elif kind == "run-config":
            lines = data.decode("utf-8", errors="replace").splitlines()
            RunConfig.from_flower(RunConfig.parse_assignments(line for line in lines if line.strip()))
        elif kind == "node-config":
            NodeConfig.from_flower(typed_assignments(data), run=RunConfig())
        else:
            raise ValueError(f"unknown input kind {kind}")
    except (UnreadableImage, MiasError, ManifestError, ConfigError):
        return "refused"
    return "ok"


def typed_assignments(data: bytes) -> dict[str, object]:
    """`key=value` lines -> a node-config mapping as Flower gives it: int, float, bool or str values."""
    values: dict[str, object] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, _, raw = line.partition("=")
        raw = raw.strip()
        value: object = raw.strip("'\"")
        if raw in ("true", "false"):
            value = raw == "true"
        elif raw.lstrip("-").isdigit() and len(raw) < 20:
            value = int(raw)
        else:
            try:
                value = float(raw)
            except ValueError:
                pass
        values[key.strip()] = value
    return values


# ---------------------------------------------------------------- the benchmark
def mutated_inputs(n_inputs: int, seed: int, seeds: dict[str, list[bytes]]):
    """(index, kind, bytes) of the benchmark's inputs: the same sequence for the same seed and seeds."""
    rng = random.Random(seed)
    for index in range(n_inputs):
        kind = rng.choices(KINDS, _WEIGHTS)[0]
        yield index, kind, mutate(rng.choice(seeds[kind]), random_mutations(rng))


def run(n_inputs: int, *, seed: int = 0, workdir: Path | None = None,
        shared_dicom: Path | None = SHARED_DICOM) -> dict:
    """Feed `n_inputs` mutated inputs; counts per kind and outcome, uncaught exceptions by type."""
    seeds = load_seeds(shared_dicom=shared_dicom)
    outcomes: Counter = Counter()
    uncaught: Counter = Counter()
    examples: dict[str, list[str]] = {}
    slowest = (0.0, "")
    started = time.perf_counter()
    if workdir is None and _MEMORY_DISK.is_dir() and os.access(_MEMORY_DISK, os.W_OK):
        workdir = _MEMORY_DISK
    with tempfile.TemporaryDirectory(prefix="mammofl-fuzz-", dir=workdir) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workspace = Workspace(Path(scratch))
        for index, kind, data in mutated_inputs(n_inputs, seed, seeds):
            began = time.perf_counter()
            try:
                outcomes[f"{kind}:{feed(kind, data, workspace)}"] += 1
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # noqa: BLE001 - what the benchmark counts
                name = f"{type(error).__module__}.{type(error).__qualname__}"
                uncaught[name] += 1
                outcomes[f"{kind}:uncaught"] += 1
                message = f"{kind} input {index}: {' '.join(str(error).split())[:200]}"
                if len(examples.setdefault(name, [])) < 5:
                    examples[name].append(message)
            took = time.perf_counter() - began
            if took > slowest[0]:
                slowest = (took, f"{kind} input {index}")
    seconds = time.perf_counter() - started
    return {
        "inputs": n_inputs,
        "seed": seed,
        "uncaught": sum(uncaught.values()),
        "uncaught_by_type": dict(uncaught.most_common()),
        "first_messages_by_type": examples,
        "outcomes": dict(sorted(outcomes.items())),
        "seeds": {kind: len(found) for kind, found in seeds.items()},
        "real_dicom_headers": bool(shared_dicom is not None and shared_dicom.is_dir()),
        "seconds": round(seconds, 1),
        "inputs_per_second": round(n_inputs / seconds, 1) if seconds else None,
        "slowest_input_s": round(slowest[0], 3),
        "slowest_input": slowest[1],
    }


def _cap_memory(gigabytes: float) -> None:
    if gigabytes > 0:
        limit = int(gigabytes * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ---------------------------------------------------------------- the corpus
def _seed(folder: Path, name: str) -> Path:
    """A corpus file: its format's name plus ``.seed`` (synthetic seeds, never mistaken for patient images)."""
    return folder / f"{name}{SEED_SUFFIX}"


def write_corpus(folder: Path = CORPUS) -> list[Path]:
    """Write the seed files (small synthetic images, an Info.txt, a manifest, config lines) into `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).astype(np.uint16)
    ramp8 = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)
    written = [
        _dicom(_seed(folder, "mammo_native16.dcm"), ramp16, "1.2.840.10008.1.2.1", WindowCenter=2048,
               WindowWidth=4096),
        _dicom(_seed(folder, "mammo_mono1_8bit.dcm"), ramp8, "1.2.840.10008.1.2.1",
               PhotometricInterpretation="MONOCHROME1",
               RescaleSlope=2, RescaleIntercept=-10),
        _dicom(_seed(folder, "mammo_rle16.dcm"), ramp16, "1.2.840.10008.1.2.5"),
        _dicom(_seed(folder, "mammo_jpeg8.dcm"), ramp8, "1.2.840.10008.1.2.4.50"),
        _dicom(_seed(folder, "mammo_j2k16.dcm"), np.tile(ramp16, (4, 4)), "1.2.840.10008.1.2.4.90"),  # 32 x 32: the
        # encoder's default 6 resolution levels need that much
        _dicom(_seed(folder, "mammo_implicit_voi_lut.dcm"), ramp16, "1.2.840.10008.1.2", voi_lut=True),
    ]
    for name, array in (("gray8.png", ramp8), ("gray16.png", ramp16)):
        Image.fromarray(array).save(_seed(folder, name), format="PNG")
        written.append(_seed(folder, name))
    Image.fromarray(ramp8).convert("P").save(_seed(folder, "palette.png"), format="PNG")
    written.append(_seed(folder, "palette.png"))
    _seed(folder, "gray8.pgm").write_bytes(b"P5\n8 8\n255\n" + ramp8.tobytes())
    _seed(folder, "gray12_comment.pgm").write_bytes(b"P5\n# 12-bit\n8 8\n4095\n"
                                                     + (ramp16 >> 4).astype(">u2").tobytes())
    _seed(folder, "mini.info").write_text(
        "MINI MIAS-LIKE TABLE\n\nmdb001 G CIRC B 535 425 197\nmdb002 G CIRC B 522 280 69\nmdb003 D NORM \n"
        "mdb004 D CALC M *NOTE 3* \nmdb005 F CALC B 10 20 5\nmdb005 F ARCH M 100 200 30\n"
        "mdb006 F NORM \nmdb007 G SPIC M 300 400 50\n"
    )
    _seed(folder, "manifest.csv").write_text(
        "file,label,patient_id,laterality,view,lesion_x,lesion_y,lesion_r\n"
        "a.png,benign,P1,L,CC,3,4,2\nb.pgm,normal,P1,R,MLO,,,\nc.dcm,malignant,P2,L,MLO,5,5,1\n"
        "c.dcm,malignant,P2,L,MLO,1,2,1\nsub/d.png,normal,P3,,,,,\n"
    )
    _seed(folder, "assignments.run").write_text(
        "num-server-rounds=3\nstrategy=fedprox\nproximal-mu=0.01\nlr=0.05\ndp=true\nnoise-multiplier=1.0\n"
        "delta=1e-5\nimage-size=512\nexplain-methods=cell_scores\nseed=7\nrun-dir=runs/x\n"
    )
    _seed(folder, "hospital.node").write_text(
        "data-dir=/data/hospital\nstate-dir=/var/lib/mammofl\nmax-epsilon=8.0\nmanifest=/data/hospital/manifest.csv\n"
        "budget-on-aggregate=false\nsecagg-max-dropouts=1\n"
    )
    _seed(folder, "simulated.node").write_text(
        "partition-id=1\nnum-partitions=3\nmax-epsilon=10\ndata-dir=/data/mini-mias\nstate-dir=/var/lib/sim\n")
    written += [_seed(folder, name) for name in ("gray8.pgm", "gray12_comment.pgm", "mini.info", "manifest.csv",
                                           "assignments.run", "hospital.node", "simulated.node")]
    return written


def _dicom(path: Path, array, syntax: str, *, voi_lut: bool = False, **attributes) -> Path:
    """A tiny mammogram (Modality MG, left CC) in transfer syntax `syntax`."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality, ds.ImageLaterality, ds.ViewPosition, ds.PatientOrientation = "MG", "L", "CC", ["A", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if array.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.Rows, ds.Columns = array.shape
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if voi_lut:
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [16, 0, 16])
        item.add_new("LUTData", "US", [n * 4096 for n in range(16)])
        ds.VOILUTSequence = Sequence([item])
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_encapsulated:
        ds.PixelData = array.tobytes()
    else:
        ds.PixelData = encapsulate([_encoded_frame(array, syntax)])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _encoded_frame(array, syntax: str) -> bytes:
    if syntax == "1.2.840.10008.1.2.5":
        from rle.rle import encode_frame

        return encode_frame(array.tobytes(), *array.shape, 1, array.dtype.itemsize * 8, "<")
    if syntax == "1.2.840.10008.1.2.4.50":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()
    from openjpeg import encode

    return encode(array, bits_stored=array.dtype.itemsize * 8, use_mct=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="mutated inputs to feed (default 100,000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default bench/results/fuzz.json)")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap (0 = none)")
    parser.add_argument("--write-corpus", action="store_true", help="(re)write tests/fuzz_corpus and stop")
    args = parser.parse_args(argv)
    if args.write_corpus:
        for path in write_corpus():
            print(path.relative_to(REPO_ROOT))
        return {}
    _cap_memory(args.memory_gb)
    result = run(args.inputs, seed=args.seed)
    result["command"] = "python -m bench.fuzz " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rate = result["inputs_per_second"]
    print(f"# hostile inputs: {result['inputs']:,} fed in {result['seconds']} s "
          f"({rate if rate is not None and math.isfinite(rate) else '-'} /s), uncaught exceptions: "
          f"{result['uncaught']} {result['uncaught_by_type'] or ''}")
    print(f"# written {args.out}")
    return result


if __name__ == "__main__":
    main()
