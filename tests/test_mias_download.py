"""mini-MIAS download over a real loopback HTTP server: verify, refuse corrupt/truncated/unsafe, resume, restart.

The archives are built from the official PGM files, rebuilt byte for byte from the shared PNG copy by
``../shared/data/tools/mias_to_pgm.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulations.mias_download import (
    DEFAULT_MANIFEST,
    ArchiveRejected,
    DownloadInterrupted,
    MiniMiasError,
    ensure_mini_mias,
    main,
    read_manifest,
)

pytestmark = pytest.mark.slow

ARCHIVE = "all-mias.tar.gz"
SMALL = ("Info.txt", "Licence.txt", "mdb001.pgm", "mdb002.pgm", "mdb003.pgm")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def official_dir(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("official-pgm")
    subprocess.run([sys.executable, str(shared_data / "tools" / "mias_to_pgm.py"), str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def _tar_gz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def archives(official_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    files = sorted(official_dir.iterdir())
    full = root / "full.tar.gz"
    with open(full, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for path in files:
                tar.add(path, arcname=path.name)
    data = full.read_bytes()
    (root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    small = [(name, (official_dir / name).read_bytes()) for name in SMALL]
    corrupt = [(n, d[:5000] + bytes([d[5000] ^ 0xFF]) + d[5001:] if n == "mdb002.pgm" else d) for n, d in small]
    return {
        "full": full,
        "truncated": root / "truncated.tar.gz",
        "small_subfolder": _tar_gz(root / "sub.tar.gz", [(f"all-mias/{n}", d) for n, d in small]),
        "small_corrupt": _tar_gz(root / "corrupt.tar.gz", corrupt),
        "traversal": _tar_gz(root / "traversal.tar.gz", [("../mdb001.pgm", small[2][1]), *small]),
        "absolute": _tar_gz(root / "absolute.tar.gz", [("/tmp/mdb001.pgm", small[2][1]), *small]),
    }


@pytest.fixture(scope="module")
def small_manifest(official_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "small.sha256"
    lines = [f"{hashlib.sha256((official_dir / n).read_bytes()).hexdigest()}  {n}" for n in SMALL]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Handler(BaseHTTPRequestHandler):
    """GET /<route>/all-mias.tar.gz. Routes: ok (honours Range), norange (ignores it), drop (cuts a first,
    range-less transfer off halfway, then honours Range), and one per archive variant."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        route = self.path.strip("/").split("/")[0]
        source, behaviour = self.server.routes[route]
        data = source.read_bytes()
        wanted = self.headers.get("Range")
        self.server.log.append({"route": route, "range": wanted, "sent": 0})
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and behaviour != "norange":
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/gzip")
        self.end_headers()
        if behaviour == "drop" and not wanted:
            body = body[: len(body) // 2]  # then the connection closes: fewer bytes than announced
            self.close_connection = True
        self.wfile.write(body)
        self.server.log[-1]["sent"] = len(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(archives):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {
        "ok": (archives["full"], "ok"),
        "drop": (archives["full"], "drop"),
        "truncated": (archives["truncated"], "ok"),
        "sub": (archives["small_subfolder"], "ok"),
        "subdrop": (archives["small_subfolder"], "drop"),
        "subnorange": (archives["small_subfolder"], "norange"),
        "corrupt": (archives["small_corrupt"], "ok"),
        "traversal": (archives["traversal"], "ok"),
        "absolute": (archives["absolute"], "ok"),
    }
    httpd.log = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = lambda route: f"http://127.0.0.1:{httpd.server_address[1]}/{route}/{ARCHIVE}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def log(server):
    server.log.clear()
    return server.log


def _leftovers(parent: Path, dest: Path) -> list[str]:
    """Anything in ``parent`` besides ``dest`` and the partial download."""
    return sorted(p.name for p in parent.iterdir() if p != dest and p.name != f"{ARCHIVE}.part")


# ------------------------------------------------------------------------------------------------ tests


def test_manifest_is_the_official_checksum_list(shared_data):
    assert DEFAULT_MANIFEST.read_bytes() == (shared_data / "mini-mias" / "SHA256SUMS.pgm").read_bytes()
    sums = read_manifest(DEFAULT_MANIFEST)
    assert len(sums) == 324 and {"Info.txt", "Licence.txt", "mdb001.pgm", "mdb322.pgm"} <= set(sums)


def test_happy_path_via_cli_then_existing_copy_is_reused(server, log, tmp_path, capsys):
    dest = tmp_path / "data" / "mini-mias"
    assert main([str(dest), "--url", server.url("ok")]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    names = sorted(p.name for p in dest.iterdir())
    assert len(names) == 324 and names[:2] == ["Info.txt", "Licence.txt"]
    assert sum(name.endswith(".pgm") for name in names) == 322
    assert (dest / "mdb001.pgm").read_bytes()[:17] == b"P5\n1024 1024\n255\n"
    assert _leftovers(dest.parent, dest) == [] and not (dest.parent / f"{ARCHIVE}.part").exists()
    assert len(log) == 1
    assert ensure_mini_mias(dest, url=server.url("ok")) == dest
    assert len(log) == 1, "a verified copy is returned without touching the network"


def test_interrupted_download_resumes_on_the_next_run(server, log, tmp_path, archives):
    dest = tmp_path / "mini-mias"
    part = tmp_path / f"{ARCHIVE}.part"
    with pytest.raises(DownloadInterrupted, match="run resumes"):
        ensure_mini_mias(dest, url=server.url("drop"), attempts=1)
    size = archives["full"].stat().st_size
    assert part.stat().st_size == size // 2
    assert not dest.exists() and _leftovers(tmp_path, dest) == []
    ensure_mini_mias(dest, url=server.url("drop"), attempts=1)
    assert [entry["range"] for entry in log] == [None, f"bytes={size // 2}-"]
    assert log[1]["sent"] == size - size // 2, "only the missing bytes were transferred"
    assert len(list(dest.iterdir())) == 324 and not part.exists()


def test_corrupted_member_is_refused_naming_it(server, tmp_path):
    dest = tmp_path / "mini-mias"
    with pytest.raises(ArchiveRejected, match=r"mdb002\.pgm is corrupted"):
        ensure_mini_mias(dest, url=server.url("corrupt"))
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == [], "no partial archive or unpacking folder is left behind"


def test_truncated_archive_is_refused(server, tmp_path):
    dest = tmp_path / "mini-mias"
    dest.mkdir()  # an empty folder made beforehand stays empty
    with pytest.raises(ArchiveRejected, match=rf"{re.escape(ARCHIVE)}\.part is truncated or corrupt"):
        ensure_mini_mias(dest, url=server.url("truncated"))
    assert list(dest.iterdir()) == []
    assert _leftovers(tmp_path, dest) == [] and not (tmp_path / f"{ARCHIVE}.part").exists()


def test_incomplete_archive_lists_missing_files(server, tmp_path):
    with pytest.raises(ArchiveRejected, match=r"lacks 319 of the 324 expected files: mdb004\.pgm"):
        ensure_mini_mias(tmp_path / "mini-mias", url=server.url("sub"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("route", ["traversal", "absolute"])
def test_unsafe_member_paths_are_refused(server, tmp_path, route, small_manifest):
    dest = tmp_path / "inner" / "mini-mias"
    with pytest.raises(ArchiveRejected, match="unsafe path"):
        ensure_mini_mias(dest, url=server.url(route), manifest=small_manifest)
    assert not dest.exists() and not (tmp_path / "mdb001.pgm").exists()
    assert list((tmp_path / "inner").iterdir()) == []


def test_subfolder_layout_and_retry_within_one_call(server, log, tmp_path, small_manifest):
    dest = tmp_path / "mini-mias"
    assert ensure_mini_mias(dest, url=server.url("subdrop"), manifest=small_manifest, attempts=2) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(SMALL)
    assert [entry["range"] is not None for entry in log] == [False, True]


def test_server_ignoring_range_restarts_from_zero(server, log, tmp_path, small_manifest):
    part = tmp_path / f"{ARCHIVE}.part"
    part.write_bytes(b"stale bytes of some earlier download")
    ensure_mini_mias(tmp_path / "mini-mias", url=server.url("subnorange"), manifest=small_manifest)
    assert log[0]["range"] == "bytes=36-"
    assert sorted(p.name for p in (tmp_path / "mini-mias").iterdir()) == sorted(SMALL)


def test_complete_part_file_is_installed_without_downloading_again(server, log, tmp_path, archives, small_manifest):
    (tmp_path / f"{ARCHIVE}.part").write_bytes(archives["small_subfolder"].read_bytes())
    ensure_mini_mias(tmp_path / "mini-mias", url=server.url("sub"), manifest=small_manifest)
    assert len(log) == 1 and log[0]["sent"] == 0  # answered 416: nothing left to send
    assert len(list((tmp_path / "mini-mias").iterdir())) == len(SMALL)


def test_existing_unverified_folder_is_left_alone(server, log, tmp_path, small_manifest):
    dest = tmp_path / "mini-mias"
    dest.mkdir()
    (dest / "Info.txt").write_text("someone else's file")
    with pytest.raises(MiniMiasError, match="not a verified mini-MIAS copy"):
        ensure_mini_mias(dest, url=server.url("sub"), manifest=small_manifest)
    assert (dest / "Info.txt").read_text() == "someone else's file" and log == []


def test_unreachable_server_is_reported(tmp_path, small_manifest):
    with pytest.raises(DownloadInterrupted, match="cannot reach"):
        ensure_mini_mias(tmp_path / "m", url=f"http://127.0.0.1:9/{ARCHIVE}", manifest=small_manifest,
                         attempts=1, timeout=5)
