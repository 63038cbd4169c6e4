"""Reading archives without trusting them: both layouts, hostile members, hostile pickles."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import pipeline.cifar as cifar_module
from pipeline.cifar import UnsafeArchiveError, iter_members, load_cifar10
from tests.helpers import (
    CLASS_NAMES,
    TinyCifar,
    py2_pickle,
    write_python_archive,
)


def test_python_and_binary_layouts_give_identical_arrays(
    tiny: TinyCifar, python_archive: Path, binary_archive: Path
) -> None:
    from_python = load_cifar10(python_archive)
    from_binary = load_cifar10(binary_archive)
    expected_train = np.concatenate([TinyCifar.planes_to_images(p) for p, _ in tiny.train_batches])
    for cifar in (from_python, from_binary):
        assert all(batch.flags.c_contiguous for batch in cifar.train_batches)
        train = np.concatenate(cifar.train_batches)
        assert train.dtype == np.uint8
        np.testing.assert_array_equal(train, expected_train)
        np.testing.assert_array_equal(cifar.train_labels, tiny.train_labels)
        expected_test = TinyCifar.planes_to_images(tiny.test_batch[0])
        assert cifar.test_images.flags.c_contiguous
        np.testing.assert_array_equal(cifar.test_images, expected_test)
        np.testing.assert_array_equal(cifar.test_labels, tiny.test_batch[1])
        assert cifar.class_names == tuple(CLASS_NAMES)


def _archive_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_a_member_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    member = tarfile.TarInfo("cifar-10-batches-py/../../evil")
    member.size = 4
    with pytest.raises(UnsafeArchiveError, match="points outside the archive's folder"):
        load_cifar10(_archive_with(tmp_path, member, b"evil"))
    member = tarfile.TarInfo("/etc/evil")
    member.size = 4
    with pytest.raises(UnsafeArchiveError, match="points outside the archive's folder"):
        load_cifar10(_archive_with(tmp_path, member, b"evil"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [(tarfile.SYMTYPE, "symbolic link to '/etc/passwd'"), (tarfile.LNKTYPE, "hard link"),
     (tarfile.CHRTYPE, "device"), (tarfile.FIFOTYPE, "FIFO")],
)  # fmt: skip
def test_links_and_devices_are_refused(tmp_path: Path, kind: bytes, message: str) -> None:
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.type = kind
    member.linkname = "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match=message):
        load_cifar10(_archive_with(tmp_path, member))


def test_an_oversized_member_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        member.size = 100 * 2**20
        archive.addfile(member)  # header only: a reader that trusted it would read 100 MB
    with pytest.raises(
        UnsafeArchiveError, match="more than the 67,108,864 a CIFAR-10 batch can be"
    ):
        load_cifar10(path)


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_runs_nothing(tmp_path: Path, tiny: TinyCifar) -> None:
    marker = tmp_path / "pwned"
    evil = py2_pickle({b"data": _RunsACommand(marker), b"labels": []})
    archive = write_python_archive(
        tmp_path / "evil.tar.gz", tiny, {"cifar-10-batches-py/data_batch_1": evil}
    )
    # The evil data_batch_1 comes after the good one in the tar stream and replaces it.
    with pytest.raises(UnsafeArchiveError, match=r"the pickle asks for (posix|os)\.system"):
        load_cifar10(archive)
    assert not marker.exists()
    # Proof that the payload is live: an ordinary unpickler would have run it.
    pickle.loads(evil)
    assert marker.exists()


def test_a_batch_with_the_wrong_shape_is_refused(tmp_path: Path, tiny: TinyCifar) -> None:
    bad = {
        b"data": np.zeros((10, 1024), dtype=np.uint8),
        b"labels": list(range(10)),
        b"batch_label": b"x",
    }
    archive = write_python_archive(
        tmp_path / "bad.tar.gz", tiny, {"cifar-10-batches-py/data_batch_3": py2_pickle(bad)}
    )
    with pytest.raises(
        UnsafeArchiveError, match=r"data_batch_3: images have \(1024,\) values, expected \(3072,\)"
    ):
        load_cifar10(archive)
    mismatched = {
        b"data": np.zeros((10, 3072), dtype=np.uint8),
        b"labels": [1, 2],
        b"batch_label": b"x",
    }
    archive = write_python_archive(
        tmp_path / "bad2.tar.gz", tiny, {"cifar-10-batches-py/test_batch": py2_pickle(mismatched)}
    )
    with pytest.raises(UnsafeArchiveError, match="10 images but 2 labels"):
        load_cifar10(archive)


def test_a_binary_batch_of_partial_records_is_refused(tmp_path: Path) -> None:
    member = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
    member.size = 3073 * 2 + 5
    with pytest.raises(UnsafeArchiveError, match="not a whole number of 3073-byte records"):
        load_cifar10(_archive_with(tmp_path, member, b"\0" * member.size))


def test_truncated_and_corrupt_archives_are_reported_as_such(
    tmp_path: Path, python_archive: Path
) -> None:
    data = python_archive.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) - 1000])
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(
        data[: len(data) // 2]
        + bytes(b ^ 0x55 for b in data[len(data) // 2 : len(data) // 2 + 50])
        + data[len(data) // 2 + 50 :]
    )
    for path in (truncated, corrupt):
        with pytest.raises(UnsafeArchiveError, match="truncated or corrupt"):
            load_cifar10(path)


def test_missing_batches_are_named(tmp_path: Path, tiny: TinyCifar) -> None:
    tiny_without = TinyCifar(tiny.train_batches[:3], tiny.test_batch)
    archive = write_python_archive(tmp_path / "short.tar.gz", tiny_without)
    with pytest.raises(UnsafeArchiveError, match="lacks data_batch_4, data_batch_5"):
        load_cifar10(archive)


def test_a_failed_read_leaves_no_inflate_thread_behind(tmp_path: Path, tiny: TinyCifar) -> None:
    """The archive is refused mid-stream, 16 MB before its end, so ISA-L's (non-daemon) thread
    is still inflating; the refusal, kept as a caller keeps it, holds no open stream."""
    extra = {
        "cifar-10-batches-py/../../evil": b"x",
        "cifar-10-batches-py/readme.html": bytes(2**24),
    }
    archive = write_python_archive(tmp_path / "bad.tar.gz", tiny, extra)
    before = set(threading.enumerate())
    with pytest.raises(UnsafeArchiveError, match="points outside the archive's folder") as refused:
        load_cifar10(archive)
    leaked = [t.name for t in threading.enumerate() if t not in before]
    assert not leaked, (leaked, refused.value)


def test_an_archive_that_inflates_beyond_the_bound_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as archive:  # zeros: 4 MB that gzip makes a few kB
        for i in range(4):
            member = tarfile.TarInfo(f"cifar-10-batches-py/padding_{i}")
            member.size = 2**20
            archive.addfile(member, io.BytesIO(bytes(member.size)))
    assert path.stat().st_size < 100_000
    with pytest.raises(UnsafeArchiveError, match=r"inflates to more than 3,145,728 bytes"):
        list(iter_members(path, max_bytes=3 * 2**20))


def test_a_hostile_pickle_beside_real_pixels_runs_nothing(tmp_path: Path, tiny: TinyCifar) -> None:
    """The payload rides in a batch whose pixels are valid: as an extra entry, or as the labels."""
    marker = tmp_path / "pwned"
    pixels = np.zeros((10, 3072), dtype=np.uint8)
    for number, evil in enumerate((
        {b"data": pixels, b"labels": [0] * 10, b"filenames": _RunsACommand(marker)},
        {b"data": pixels, b"labels": _RunsACommand(marker)},
    )):  # fmt: skip
        archive = write_python_archive(
            tmp_path / f"evil{number}.tar.gz",
            tiny,
            {"cifar-10-batches-py/data_batch_2": py2_pickle(evil)},
        )
        with pytest.raises(
            UnsafeArchiveError, match=r"data_batch_2: the pickle asks for (posix|os)\.system"
        ):
            load_cifar10(archive)
    assert not marker.exists()


def test_an_archive_that_cannot_be_opened_is_reported_as_unreadable(
    python_archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    # as open() does for a user without read rights
    monkeypatch.setattr(cifar_module.igzip_threaded, "open", refuse)
    with pytest.raises(UnsafeArchiveError, match=r"not a readable tar.gz archive \(Permission"):
        load_cifar10(python_archive)
