"""Fetch the official mini-MIAS distribution, verify every file, unpack it atomically.

``ensure_mini_mias(dest)`` returns ``dest`` at once when it already holds a verified copy. Otherwise it downloads
``all-mias.tar.gz`` to ``dest.parent/all-mias.tar.gz.part`` (an interrupted download resumes with an HTTP Range
request; a server that ignores Range makes it start over), checks the SHA-256 of every expected member against
the manifest committed with the project (``mini_mias.sha256``: the 322 ``mdbNNN.pgm`` files, ``Info.txt`` and
``Licence.txt``), unpacks into a temporary folder beside ``dest`` and moves that into place in one rename. A
corrupted, truncated or unsafe archive raises :class:`ArchiveRejected` naming the file; ``dest`` is never left
half-written.

CLI: ``python -m simulations.mias_download DEST [--url URL]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://peipa.essex.ac.uk/pix/mias/all-mias.tar.gz"
DEFAULT_MANIFEST = Path(__file__).with_name("mini_mias.sha256")
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MiniMiasError(RuntimeError):
    """The mini-MIAS copy could not be obtained; the message says why and what to do."""


class DownloadInterrupted(MiniMiasError):
    """The transfer stopped early; the partial file is kept and the next run resumes it."""


class ArchiveRejected(MiniMiasError):
    """The downloaded archive is corrupt, truncated, incomplete or unsafe; it has been deleted."""


def ensure_mini_mias(
    dest: Path,
    *,
    url: str = DEFAULT_URL,
    manifest: Path = DEFAULT_MANIFEST,
    timeout: float = 60.0,
    attempts: int = 3,
) -> Path:
    """A verified mini-MIAS folder at ``dest``: the existing one, or one downloaded from ``url``.

    ``timeout`` is per network operation (seconds); ``attempts`` is how many times an interrupted transfer is
    resumed within this call before :class:`DownloadInterrupted` is raised (a later call resumes it again).
    """
    dest = Path(dest)
    sums = read_manifest(manifest)
    if dest.exists():
        problems = verify_folder(dest, sums)
        if not problems:
            logger.info("mini-MIAS already present and verified at %s", dest)
            return dest
        if not dest.is_dir() or any(dest.iterdir()):
            raise MiniMiasError(
                f"{dest} exists but is not a verified mini-MIAS copy ({problems[0]}"
                f"{f' and {len(problems) - 1} more problems' if len(problems) > 1 else ''}); "
                "remove it or choose another folder"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive_name = PurePosixPath(urllib.request.urlparse(url).path).name or "all-mias.tar.gz"
    part = dest.parent / f"{archive_name}.part"
    download(url, part, timeout=timeout, attempts=attempts)
    try:
        install_archive(part, dest, sums)
    except ArchiveRejected:
        part.unlink(missing_ok=True)
        raise
    part.unlink(missing_ok=True)
    logger.info("mini-MIAS verified and unpacked at %s", dest)
    return dest


def read_manifest(path: Path) -> dict[str, str]:
    """File name -> sha256 hex from a ``sha256sum``-style file (``DIGEST  NAME`` or ``DIGEST *NAME``)."""
    sums: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        digest, name = fields[0].lower(), fields[1].strip().lstrip("*") if len(fields) == 2 else ""
        if not _HEX64.fullmatch(digest) or not name or "/" in name or name in sums:
            raise MiniMiasError(f"{path}: line {number} is not a valid, unique 'SHA256  NAME' entry: {line!r}")
        sums[name] = digest
    if not sums:
        raise MiniMiasError(f"{path}: manifest is empty")
    return sums


def verify_folder(folder: Path, sums: dict[str, str]) -> list[str]:
    """Problems of ``folder`` against the manifest (missing or mismatching files); empty when verified."""
    problems = []
    for name, digest in sorted(sums.items()):
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def download(url: str, part: Path, *, timeout: float = 60.0, attempts: int = 3) -> None:
    """Complete ``part`` from ``url``, resuming what is already there; retries interrupted transfers."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            _fetch(url, part, timeout=timeout)
            return
        except DownloadInterrupted as exc:
            if attempt == attempts:
                raise
            logger.warning("%s; resuming (attempt %d of %d)", exc, attempt + 1, attempts)


def install_archive(archive: Path, dest: Path, sums: dict[str, str]) -> Path:
    """Verify every manifest member of ``archive`` and move them, as one folder, to ``dest`` (absent or empty)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        _unpack_verified(archive, staging, sums)
        os.replace(staging, dest)  # atomic; replaces an empty folder, refuses a non-empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _fetch(url: str, part: Path, *, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "mammofl-mias-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: complete already, or the server's file changed
            total = _parse_content_range(err.headers.get("Content-Range", ""))[2]
            if total == have:
                return
            part.unlink()
            return _fetch(url, part, timeout=timeout)
        raise MiniMiasError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadInterrupted(f"cannot reach {url}: {getattr(err, 'reason', err)}") from err
    with response:
        mode = "wb"
        if have and response.status == 206:
            start, _, total = _parse_content_range(response.headers.get("Content-Range", ""))
            if start != have:
                logger.warning("server resumed at byte %s instead of %d: starting over", start, have)
                response.close()
                part.unlink()
                return _fetch(url, part, timeout=timeout)
            mode = "ab"
            logger.info("resuming download at byte %d", have)
        elif response.status == 200:
            if have:
                logger.info("server ignored the range request: downloading from the start")
            have = 0
        else:
            raise MiniMiasError(f"download of {url} failed: unexpected HTTP status {response.status}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = _copy_body(response, part, mode=mode, expected=expected, offset=have)
    if expected is not None and received < expected:
        raise DownloadInterrupted(
            f"download of {url} interrupted after {have + received} of {have + expected} bytes; "
            f"{part.name} is kept and the next run resumes it"
        )


def _copy_body(response, part: Path, *, mode: str, expected: int | None, offset: int) -> int:
    received = 0
    next_report = 0.1
    with open(part, mode) as out:
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                if expected and received / expected >= next_report:
                    logger.info("downloaded %d MB (%d%%)", (offset + received) >> 20, 100 * received // expected)
                    next_report += 0.1
        except (http.client.HTTPException, OSError) as err:
            raise DownloadInterrupted(
                f"download interrupted after {offset + received} bytes ({err}); "
                f"{part.name} is kept and the next run resumes it"
            ) from err
    return received


def _parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        star = re.fullmatch(r"bytes\s+\*/(\d+)", value.strip())
        return None, None, int(star.group(1)) if star else None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def _unpack_verified(archive: Path, staging: Path, sums: dict[str, str]) -> None:
    """Copy each manifest member into ``staging``, checking its SHA-256; raise ArchiveRejected on any problem."""
    found: set[str] = set()
    folder: PurePosixPath | None = None
    current = None
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                path = _safe_member_path(archive, member.name)
                if path.name not in sums:
                    logger.debug("ignoring archive member %s", member.name)
                    continue
                current = member.name
                if not member.isfile():
                    raise ArchiveRejected(f"{archive.name}: {member.name} is not a regular file")
                if path.name in found:
                    raise ArchiveRejected(f"{archive.name}: {path.name} appears twice")
                if folder is None:
                    folder = path.parent
                elif path.parent != folder:
                    raise ArchiveRejected(f"{archive.name}: {member.name} lies outside {folder}/ like the others")
                digest = _copy_member(tar, member, staging / path.name)
                if digest != sums[path.name]:
                    raise ArchiveRejected(
                        f"{archive.name}: {member.name} is corrupted (sha256 {digest}, expected {sums[path.name]})"
                    )
                found.add(path.name)
                current = None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        where = f" while reading {current}" if current else ""
        raise ArchiveRejected(f"{archive.name} is truncated or corrupt{where}: {err}") from err
    missing = sorted(set(sums) - found)
    if missing:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ArchiveRejected(f"{archive.name} lacks {len(missing)} of the {len(sums)} expected files: {shown}")


def _safe_member_path(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or (path.parts and ":" in path.parts[0]):
        raise ArchiveRejected(f"{archive.name}: unsafe path {name!r} in archive (absolute or leaving the folder)")
    return path


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    digest = hashlib.sha256()
    source = tar.extractfile(member)
    with source, open(target, "xb") as out:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.mias_download", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to hold the verified mini-MIAS files")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"archive URL (default {DEFAULT_URL})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = ensure_mini_mias(args.dest, url=args.url)
    except MiniMiasError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
