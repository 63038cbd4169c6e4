"""Stage `download`: fetches the CIFAR-10 archive to paths.archive and verifies its content.

The source is `data.url`, or the CIFAR10_URL environment variable when set (http(s)://, file://
or a plain path). Bytes go to `<archive>.part`, which survives an interruption and is resumed with
an HTTP Range request; the archive appears under its real name only once whole and verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests
import tenacity
from tqdm import tqdm

from pipeline.backoff import retrying
from pipeline.cifar import PYTHON_DIR, PYTHON_MEMBER_MD5, UnsafeArchiveError, member_md5s
from pipeline.config import DataParams, load_params
from pipeline.errors import PipelineError
from pipeline.stage_runner import run_stage, stop_point

log = logging.getLogger(__name__)

URL_ENV = "CIFAR10_URL"
OFFICIAL_PYTHON_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
OFFICIAL_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CHUNK = 1 << 20  # bytes per read/write of local files
# Bytes per network read. A read cut by a dropped connection is lost whole, so this is also the
# most a resume re-fetches.
HTTP_CHUNK = 64 * 1024
BACKOFF_SECONDS = 1.0  # wait before the first retry; doubles after each failure
BACKOFF_MAX_SECONDS = 30.0


class DownloadError(PipelineError):
    """The archive could not be fetched."""


class ChecksumError(PipelineError):
    """The archive is not the CIFAR-10 it claims to be."""


class _Transient(Exception):
    """A failure worth retrying: a dropped connection, a timeout, a cut body, a 5xx."""


@dataclass(frozen=True)
class Verified:
    sha256: str
    method: str  # how it was accepted, for the log


# --- sources ------------------------------------------------------------------------------------


def resolve_source(configured_url: str) -> str:
    """CIFAR10_URL, when set, overrides data.url without touching tracked files."""
    override = os.environ.get(URL_ENV, "").strip()
    if override:
        log.info("using %s=%s instead of data.url", URL_ENV, override)
        return override
    return configured_url


def _local_path(source: str) -> Path | None:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise DownloadError(
            f"cannot fetch {source!r}: scheme {parsed.scheme!r} is not supported "
            "(use http://, https://, file:// or a plain path)"
        )
    return Path(source)


# --- fetching -----------------------------------------------------------------------------------


def fetch(source: str, part: Path, *, timeout: float, retries: int) -> None:
    """Brings the source's bytes to `part`, resuming what an earlier attempt left there."""
    local = _local_path(source)
    if local is not None:
        _copy_local(local, part)
    else:
        _fetch_http(source, part, timeout=timeout, retries=retries)


def _copy_local(source: Path, part: Path) -> None:
    if not source.is_file():
        raise DownloadError(
            f"no such file {source.resolve()} (from data.url or {URL_ENV}); "
            f"point {URL_ENV} at a copy of cifar-10-python.tar.gz"
        )
    total = source.stat().st_size
    with source.open("rb") as src, part.open("wb") as dst, _progress(total, 0, source.name) as bar:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))
            stop_point()


def _fetch_http(url: str, part: Path, *, timeout: float, retries: int) -> None:
    """Up to `retries` more attempts after transient failures, each resuming the last."""
    attempts = retrying(
        f"download of {url}",
        retry=tenacity.retry_if_exception_type(_Transient),
        stop=tenacity.stop_after_attempt(retries + 1),
        first_wait=BACKOFF_SECONDS,
        max_wait=BACKOFF_MAX_SECONDS,
    )
    try:
        attempts(_fetch_http_once, url, part, timeout)
    except _Transient as error:
        have = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"download of {url} failed after {retries + 1} attempts ({error}); "
            f"{have:,} bytes kept in {part}, so rerunning resumes from there. Check the "
            f"network or set {URL_ENV} to a mirror or a local file"
        ) from None


def _fetch_http_once(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 416 and have:
                # Our partial file is at least as long as the resource: it may be whole already;
                # verification decides. (A server that ignores ranges answers 200 instead.)
                return
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"HTTP {response.status_code} {response.reason}")
            if response.status_code >= 400:
                raise DownloadError(
                    f"download of {url} failed: HTTP {response.status_code} {response.reason}; "
                    f"check data.url in params.yaml or set {URL_ENV} to a mirror or a local file"
                )
            resuming = response.status_code == 206
            if resuming:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != have:
                    raise _Transient(f"server resumed at byte {start}, expected {have}")
                log.info("resuming %s at byte %s", url, f"{have:,}")
            else:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            with (
                part.open("ab" if resuming else "wb") as out,
                _progress(total, have, Path(urllib.parse.urlparse(url).path).name) as bar,
            ):
                cut = False
                try:
                    for chunk in response.iter_content(HTTP_CHUNK):
                        out.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
                        stop_point()
                except requests.exceptions.ChunkedEncodingError:
                    cut = True  # reported just below, with how far it got
            if cut or (total is not None and have < total):
                expected = "an unknown number of" if total is None else f"{total:,}"
                raise _Transient(f"connection closed at {have:,} of {expected} bytes")
    except requests.exceptions.ConnectionError as error:
        reason = "connection refused" if "refused" in str(error).lower() else "connection failed"
        raise _Transient(f"{reason}: {_root_cause(error)}") from None
    except (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as error:
        raise _Transient(f"{type(error).__name__}: {_root_cause(error)}") from None
    except requests.exceptions.RequestException as error:
        raise DownloadError(f"download of {url} failed: {error}") from None


def _content_range_start(header: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _root_cause(error: BaseException) -> str:
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _progress(total: int | None, initial: int, name: str) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        mininterval=1.0,
        disable=None,  # disable=None: no bar when stderr is not a terminal
    )


# --- verification -------------------------------------------------------------------------------


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def verify_archive(
    path: Path, pinned_sha256: str | None, members_md5: Mapping[str, str] = PYTHON_MEMBER_MD5
) -> Verified:
    """Accepts the archive by its content: the pinned SHA-256, the official archive's digest,
    or the official members' MD5s (`members_md5`, by name in cifar-10-batches-py/).
    Raises ChecksumError with expected versus found."""
    sha256, md5 = file_digests(path)
    if pinned_sha256 is not None:
        if sha256 != pinned_sha256:
            raise ChecksumError(
                f"{path}: SHA-256 {sha256} does not match data.sha256 {pinned_sha256} "
                "in params.yaml"
            )
        return Verified(sha256, "pinned data.sha256")
    if sha256 == OFFICIAL_PYTHON_SHA256:
        return Verified(sha256, "official python-version SHA-256")
    if md5 == OFFICIAL_BINARY_MD5:
        return Verified(sha256, "official binary-version MD5")
    # A repacked tarball is fine if every member is byte-for-byte the official one.
    try:
        found = member_md5s(path)
    except UnsafeArchiveError as error:
        raise ChecksumError(str(error)) from None
    for name, expected in members_md5.items():
        member = f"{PYTHON_DIR}/{name}"
        if found.get(member) != expected:
            raise ChecksumError(
                f"{path}: not the official CIFAR-10: SHA-256 {sha256} is neither the python "
                f"version's {OFFICIAL_PYTHON_SHA256} nor (by MD5 {md5}) the binary version's, and "
                f"member {member} has MD5 {found.get(member, 'missing')}, expected {expected}"
            )
    return Verified(sha256, "official MD5 of all seven members (repacked archive)")


def download(source: str, archive: Path, data: DataParams) -> Verified:
    """Fetches `source` to `archive` via `<archive>.part`; the archive appears only if verified."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    fetch(source, part, timeout=data.timeout, retries=data.retries)
    try:
        verified = verify_archive(part, data.sha256)
    except PipelineError:
        part.unlink(missing_ok=True)  # a bad file must not be resumed nor become the output
        raise
    os.replace(part, archive)
    return verified


def main() -> None:
    params = load_params()
    source = resolve_source(params.data.url)
    archive = params.paths.archive
    log.info("fetching %s -> %s", source, archive)
    verified = download(source, archive, params.data)
    log.info("%s verified (%s), sha256 %s", archive, verified.method, verified.sha256)


if __name__ == "__main__":
    run_stage(main)
