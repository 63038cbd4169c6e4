"""Inflating a gzip file in pieces on several threads: exact output, and every failure reported."""

from __future__ import annotations

import gzip
import io
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline import gunzip
from pipeline.gunzip import GzipError, Inflater, LimitExceeded

LIMIT = 64 * 2**20


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of a few hundred kB, so that a test file of 2 MB splits as CIFAR-10 does."""
    monkeypatch.setattr(gunzip, "MIN_PIECE", 1 << 17)
    monkeypatch.setattr(gunzip, "SEARCH_SPAN", 1 << 19)
    monkeypatch.setattr(gunzip, "VERIFY_SPAN", 1 << 19)


def noise(size: int, seed: int = 0) -> bytes:
    """Bytes of a narrow bell curve: deflate codes them as CIFAR's pixels, in dynamic-Huffman
    blocks of about 16 kB with few matches."""
    rng = np.random.default_rng(seed)
    return rng.normal(128, 12, size).clip(0, 255).astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def inflate(path: Path, pieces: int, limit: int = LIMIT) -> tuple[bytes, Inflater]:
    inflater = Inflater(path, limit, pieces=pieces)
    try:
        inflater.finish()
        if inflater.error is not None:
            raise inflater.error
        return bytes(inflater.view(0, inflater.wait(limit + 1))), inflater
    finally:
        inflater.close()


def inflate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "inflate"]


@pytest.mark.parametrize("pieces", [1, 2, 3, 4])
def test_pieces_inflate_to_what_gunzip_gives(tmp_path: Path, pieces: int) -> None:
    data = noise(4 * 2**20)
    out, inflater = inflate(write_gz(tmp_path / "noise.gz", data), pieces)
    assert out == data
    assert inflater.parts() == pieces  # each piece found a block, joined, and delivered
    assert not inflate_threads()


def test_a_block_header_found_by_chance_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Take every offset whose bits read as a header for a block, without trying to inflate it:
    # nearly all of them lie inside blocks, so the pieces that start there never agree.
    monkeypatch.setattr(gunzip, "_inflates", lambda data, start: True)
    data = noise(4 * 2**20, seed=1)
    out, inflater = inflate(write_gz(tmp_path / "noise.gz", data), pieces=3)
    assert out == data
    assert inflater.parts() == 1


def test_a_piece_that_leans_on_the_window_for_too_long_is_dropped(tmp_path: Path) -> None:
    # The second half of each kB copies the second half of the kB 30 kB back, which copied the
    # one before it, and so on: a piece inflated against a window of zeros never stops
    # depending on it.
    rng = np.random.default_rng(2)
    data = bytearray(rng.integers(0, 256, 30 * 1024, dtype=np.uint8).tobytes())
    while len(data) < 4 * 2**20:
        source = len(data) + 512 - 30 * 1024
        data += noise(512, seed=len(data))
        data += data[source : source + 512]
    out, inflater = inflate(write_gz(tmp_path / "chained.gz", bytes(data)), pieces=2)
    assert out == data
    assert inflater.parts() == 1


def test_incompressible_data_in_stored_blocks_inflates_in_one_piece(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 256, 2**21, dtype=np.uint8).tobytes()
    out, inflater = inflate(write_gz(tmp_path / "random.gz", data), pieces=2)
    assert out == data and inflater.parts() == 1


@pytest.mark.parametrize("pieces", [1, 3])
def test_a_truncated_file_is_reported(tmp_path: Path, pieces: int) -> None:
    whole = gzip.compress(noise(3 * 2**20), mtime=0)
    for cut, message in [(1000, "truncated"), (4, "trailer"), (len(whole) - 5, "truncated")]:
        path = tmp_path / "cut.gz"
        path.write_bytes(whole[: len(whole) - cut])
        with pytest.raises(GzipError, match=message):
            inflate(path, pieces)
    assert not inflate_threads()


@pytest.mark.parametrize("pieces", [1, 3])
def test_corrupt_bytes_in_any_piece_are_reported(tmp_path: Path, pieces: int) -> None:
    whole = bytearray(gzip.compress(noise(3 * 2**20), mtime=0))
    for where in (0.3, 0.6, 0.9):  # inside the first, second and third pieces
        corrupt = whole.copy()
        middle = int(len(whole) * where)
        corrupt[middle : middle + 50] = bytes(b ^ 0x55 for b in corrupt[middle : middle + 50])
        path = tmp_path / "corrupt.gz"
        path.write_bytes(corrupt)
        with pytest.raises(GzipError, match="corrupt|CRC"):
            inflate(path, pieces)


def test_the_crc_and_the_length_are_checked(tmp_path: Path) -> None:
    whole = bytearray(gzip.compress(noise(3 * 2**20), mtime=0))
    bad_crc, bad_length = whole.copy(), whole.copy()
    bad_crc[-8] ^= 1
    bad_length[-4] ^= 1
    for data, message in [(bad_crc, "CRC-32"), (bad_length, "length")]:
        path = tmp_path / "bad.gz"
        path.write_bytes(data)
        with pytest.raises(GzipError, match=message):
            inflate(path, pieces=3)


def test_concatenated_members_and_zero_padding_are_read_whole(tmp_path: Path) -> None:
    first, second = noise(2 * 2**20, seed=4), b"second member\n"
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(first, mtime=0) + gzip.compress(second) + bytes(512))
    out, _ = inflate(path, pieces=2)
    assert out == first + second
    path.write_bytes(gzip.compress(first, mtime=0) + b"garbage")
    with pytest.raises(GzipError, match="unexpected bytes after the gzip stream"):
        inflate(path, pieces=2)


def test_header_fields_are_skipped_and_bad_headers_refused(tmp_path: Path) -> None:
    data = noise(2**21, seed=5)
    buffer = io.BytesIO()
    with gzip.GzipFile("cifar-10-python.tar", "wb", fileobj=buffer, mtime=0) as file:
        file.write(data)  # FNAME set: the name precedes the deflate stream
    path = tmp_path / "named.gz"
    path.write_bytes(buffer.getvalue())
    assert inflate(path, pieces=2)[0] == data
    for header, message in [
        (b"\x1f\x8b\x07\x00" + bytes(16), "compression method 7"),
        (b"\x1f\x8b\x08\x20" + bytes(16), "reserved gzip header flags"),
        (b"\x1f\x8b\x08\x00", "ends inside gzip's header"),
    ]:
        path.write_bytes(header)
        with pytest.raises(GzipError, match=message):
            inflate(path, pieces=2)


def test_a_plain_file_is_its_own_output(tmp_path: Path) -> None:
    path = tmp_path / "plain.tar"
    path.write_bytes(b"not gzip" * 100)
    assert inflate(path, pieces=2)[0] == b"not gzip" * 100
    with pytest.raises(LimitExceeded):
        inflate(path, pieces=2, limit=10)


@pytest.mark.parametrize("pieces", [1, 3])
def test_the_limit_holds_across_pieces(tmp_path: Path, pieces: int) -> None:
    path = write_gz(tmp_path / "noise.gz", noise(4 * 2**20))
    with pytest.raises(LimitExceeded, match="inflates to more than 3,000,000 bytes"):
        inflate(path, pieces, limit=3_000_000)
    assert inflate(path, pieces, limit=4 * 2**20)[0] == noise(4 * 2**20)  # exactly the limit
    assert not inflate_threads()


def test_a_reader_that_stops_early_stops_every_piece(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "noise.gz", noise(4 * 2**20))
    inflater = Inflater(path, LIMIT, pieces=3)
    assert bytes(inflater.view(0, 10)) == noise(4 * 2**20)[:10]
    inflater.close()
    assert not inflate_threads()


def test_views_within_a_piece_are_not_copies_and_across_pieces_are_whole(tmp_path: Path) -> None:
    data = noise(4 * 2**20, seed=6)
    path = write_gz(tmp_path / "noise.gz", data)
    inflater = Inflater(path, LIMIT, pieces=2)
    try:
        inflater.finish()
        assert inflater.parts() == 2
        whole = inflater.view(0, len(data))  # spans both pieces: joined in a copy
        assert bytes(whole) == data
        first = inflater.view(0, 1000)
        assert bytes(first) == data[:1000] and first.obj is not None
        buffer = bytearray(100)
        assert inflater.read_into(len(data) - 50, memoryview(buffer)) == 50
        assert bytes(buffer[:50]) == data[-50:]
    finally:
        inflater.close()
