"""Reads a CIFAR-10 archive (python or binary version) into arrays, without trusting it.

Nothing is extracted to disk. A background thread inflates the tar.gz into one buffer in memory
(ISA-L drops the GIL while it inflates), and members are read from that buffer as soon as their
bytes are there: each one is checked (a safe relative path, a regular file, a bounded size) and
decoded while the next is still inflating, so the decoding overlaps the inflate on a second core.
The python version's batches are pickles, so they are read with an unpickler that admits
NumPy's array reconstruction and nothing else: a hostile archive raises UnsafeArchiveError and
runs no code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
from isal import igzip, isal_zlib  # ISA-L: inflates CIFAR-10 in 0.53 s, zlib in 0.9 s

from pipeline.errors import PipelineError

_IsalError = cast(
    "type[Exception]", isal_zlib.error
)  # a corrupt deflate stream, as ISA-L reports it
PYTHON_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = 5
IMAGE_SHAPE = (32, 32, 3)
PIXELS = 32 * 32 * 3  # one image, channel planes R|G|B of 32x32 each
NUM_CLASSES = 10
MAX_MEMBER_BYTES = 64 * 2**20  # a real batch is 31 MB; anything much larger is not CIFAR-10
MAX_MEMBERS = 100  # the real archives hold 8 or 9 entries
# Either version inflates to 186 MB. The buffer is reserved at this size, but only the pages the
# archive fills become memory.
MAX_TAR_BYTES = 8 * MAX_MEMBER_BYTES
CHUNK = 1 << 20

# md5 of each member of the official python version (the tarball itself may be repacked).
PYTHON_MEMBER_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


class UnsafeArchiveError(PipelineError):
    """The archive is corrupt, hostile or not CIFAR-10."""


@dataclass(frozen=True)
class Batch:
    """One decoded batch: `split` is "train" (`number` 1-5) or "test" (`number` 0)."""

    split: str
    number: int
    images: np.ndarray  # uint8 (N, 32, 32, 3), channels-last, as TensorFlow's CPU kernels want
    labels: np.ndarray  # uint8 (N,)


@dataclass(frozen=True)
class Cifar10:
    """The archive's contents: the five training batches in order, the test batch, the classes."""

    train_batches: tuple[np.ndarray, ...]  # data_batch_1..5, each (N, 32, 32, 3)
    train_labels: np.ndarray  # uint8 (N,), all training batches concatenated
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def train_images(self, indices: np.ndarray) -> np.ndarray:
        """The training images at `indices` (ascending), as a C-ordered (k, 32, 32, 3) array."""
        if np.any(np.diff(indices) <= 0):
            raise ValueError("indices must be strictly ascending")
        out = np.empty((len(indices), *IMAGE_SHAPE), dtype=np.uint8)
        start = 0  # first training image of the current batch
        for images in self.train_batches:
            lo, hi = np.searchsorted(indices, [start, start + len(images)])
            np.take(images, indices[lo:hi] - start, axis=0, out=out[lo:hi])  # whole rows
            start += len(images)
        return out


# --- the tar stream ---------------------------------------------------------------------------


class _Inflater:
    """The archive's tar bytes, inflated into one buffer by a background thread.

    `wait(end)` blocks until the first `end` bytes are there (or the stream has ended), so a
    reader works on one member while the thread inflates the next. The stream's own error, if
    it has one, is kept in `error` for the reader to report.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # np.empty does not touch the pages: only what the archive fills becomes memory.
        self.buffer = np.empty(MAX_TAR_BYTES, dtype=np.uint8)
        self.size = 0  # bytes inflated so far
        self.done = False
        self.error: Exception | None = None
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._inflate, name="inflate", daemon=True)
        self._thread.start()

    def _inflate(self) -> None:
        try:
            with _open_stream(self.path) as stream:
                while not self._stop:
                    if self.size == MAX_TAR_BYTES:
                        if stream.read(1):
                            raise UnsafeArchiveError(
                                f"{self.path}: inflates to more than {MAX_TAR_BYTES:,} bytes; "
                                "CIFAR-10 inflates to 186 MB"
                            )
                        break
                    read = stream.readinto(self.buffer[self.size : self.size + CHUNK].data)
                    if not read:
                        break
                    with self._changed:
                        self.size += read
                        self._changed.notify_all()
        except Exception as error:  # handed to the reader, who reports it with the archive's name
            self.error = error
        finally:
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def wait(self, end: int) -> int:
        """How many bytes are there once `end` are, or once the stream has ended short of it."""
        with self._changed:
            self._changed.wait_for(lambda: self.size >= end or self.done)
            return self.size

    def finish(self) -> None:
        """Waits for the whole stream (gzip checks its CRC and length at the end)."""
        self.wait(MAX_TAR_BYTES + 1)

    def close(self) -> None:
        self._stop = True
        self._thread.join()


class _InflatedFile(io.RawIOBase):
    """A seekable file over the inflater's buffer whose reads wait for the bytes they need."""

    def __init__(self, inflater: _Inflater) -> None:
        self.inflater = inflater
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        start = self.position
        available = self.inflater.wait(start + len(buffer))
        count = max(0, min(len(buffer), available - start))
        memoryview(buffer).cast("B")[:count] = self.inflater.buffer[start : start + count].data
        self.position += count
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.position
        elif whence != os.SEEK_SET:  # tarfile never seeks from the end when reading
            raise io.UnsupportedOperation("seek from the end of an inflating archive")
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position


def iter_members(path: Path) -> Iterator[tuple[str, memoryview]]:
    """Yields (path inside the archive, content) of each regular file, after safety checks.

    The contents are views of the inflated archive, not copies. After the last member, the
    whole stream has been inflated, so gzip's CRC and length have been checked.
    """
    if not path.is_file():
        raise UnsafeArchiveError(f"{path}: no such file")
    inflater = _Inflater(path)
    failure: Exception | None = None
    try:
        try:
            yield from _checked_members(path, inflater)
        except (tarfile.TarError, EOFError, UnsafeArchiveError) as error:
            failure = error
        inflater.finish()  # (not when the caller stops early: then the thread just stops)
    finally:
        inflater.close()
    # The stream's own error (truncated, corrupt) comes first: a member or tar header that makes
    # no sense is often its symptom.
    stream_error = inflater.error
    if isinstance(stream_error, UnsafeArchiveError):
        raise stream_error
    if isinstance(stream_error, (zlib.error, EOFError, OSError, _IsalError)):
        raise _unreadable(path, stream_error) from None
    if stream_error is not None:
        raise stream_error
    if isinstance(failure, UnsafeArchiveError):
        raise failure
    if failure is not None:
        raise _unreadable(path, failure) from None


def _checked_members(path: Path, inflater: _Inflater) -> Iterator[tuple[str, memoryview]]:
    with tarfile.open(fileobj=_InflatedFile(inflater), mode="r:") as archive:
        for count, member in enumerate(archive, start=1):
            if count > MAX_MEMBERS:
                raise UnsafeArchiveError(f"{path}: more than {MAX_MEMBERS} members")
            name = _safe_name(path, member.name)
            if member.isdir():
                continue
            if not member.isreg():
                raise UnsafeArchiveError(
                    f"{path}: member {member.name!r} is a {_kind(member)}; "
                    "only regular files and folders are allowed"
                )
            if member.size > MAX_MEMBER_BYTES:
                raise UnsafeArchiveError(
                    f"{path}: member {member.name!r} is {member.size:,} bytes, more than "
                    f"the {MAX_MEMBER_BYTES:,} a CIFAR-10 batch can be"
                )
            end = member.offset_data + member.size
            if inflater.wait(end) < end:
                raise EOFError(f"member {member.name!r} ends after the archive does")
            yield name, inflater.buffer[member.offset_data : end].data


def _unreadable(path: Path, error: Exception) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{path}: not a readable tar.gz archive ({type(error).__name__}: {error}); "
        "the file is truncated or corrupt: download it again"
    )


def _open_stream(path: Path) -> io.BufferedIOBase:
    """The archive's tar bytes: gunzipped when it starts with gzip's magic number."""
    with path.open("rb") as file:
        magic = file.read(2)
    if magic == b"\x1f\x8b":
        return igzip.open(path, "rb")
    return path.open("rb")


def _safe_name(path: Path, name: str) -> str:
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or "\\" in name or name.startswith("/"):
        raise UnsafeArchiveError(
            f"{path}: member {name!r} points outside the archive's folder; refusing the archive"
        )
    return posix.as_posix().removeprefix("./")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    return f"special entry (type {member.type!r})"


def member_md5s(path: Path) -> dict[str, str]:
    """md5 of every regular file in the archive, by path inside it."""
    return {name: hashlib.md5(data).hexdigest() for name, data in iter_members(path)}


# --- decoding ---------------------------------------------------------------------------------


def load_cifar10(path: Path, on_batch: Callable[[Batch], None] | None = None) -> Cifar10:
    """Decodes either version of the archive; the layout is recognised from its members.

    `on_batch` sees each batch as soon as it is decoded, while the later members are still
    inflating: work done there overlaps the inflate. A batch that a later member of the same
    name replaces is seen twice; the last one counts.
    """
    train: dict[int, Batch] = {}
    test: Batch | None = None
    class_names: tuple[str, ...] | None = None
    layouts: set[str] = set()
    members = iter_members(path)
    for name, data in members:
        parts = name.split("/")
        if len(parts) != 2 or parts[0] not in (PYTHON_DIR, BINARY_DIR):
            continue  # readme.html and the like
        folder, file = parts
        decoder = _PYTHON_FILES if folder == PYTHON_DIR else _BINARY_FILES
        match = _match_file(decoder, file)
        if match is None:
            continue
        layouts.add(folder)
        kind, index = match
        where = f"{path}:{name}"
        try:
            if kind == "meta":
                class_names = _decode_meta(folder, data, where)
                continue
            planes, labels = _decode_batch(folder, data, where)
        except UnsafeArchiveError:
            # Garbled bytes may be the symptom of a corrupt stream: say so if that is the cause.
            for _ in members:
                pass
            raise
        batch = Batch(kind, index, _channels_last(planes), labels)
        if kind == "test":
            test = batch
        else:
            train[index] = batch
        if on_batch is not None:
            on_batch(batch)
    if len(layouts) > 1:
        raise UnsafeArchiveError(f"{path}: holds both {PYTHON_DIR}/ and {BINARY_DIR}/; use one")
    if not layouts:
        raise UnsafeArchiveError(
            f"{path}: no CIFAR-10 batches found (expected {PYTHON_DIR}/ or {BINARY_DIR}/)"
        )
    (folder,) = layouts
    missing = [f"data_batch_{i}" for i in range(1, TRAIN_BATCHES + 1) if i not in train]
    missing += ["test_batch"] if test is None else []
    missing += ["batches.meta"] if class_names is None else []
    if missing:
        raise UnsafeArchiveError(f"{path}: {folder}/ lacks {', '.join(missing)}")
    assert test is not None and class_names is not None  # narrowed by `missing` above
    for batch in [*train.values(), test]:
        if batch.labels.size and int(batch.labels.max()) >= len(class_names):
            where = "test_batch" if batch.split == "test" else f"data_batch_{batch.number}"
            raise UnsafeArchiveError(
                f"{path}: {where} has label {int(batch.labels.max())}, but batches.meta names "
                f"{len(class_names)} classes"
            )
    ordered = [train[i] for i in range(1, TRAIN_BATCHES + 1)]
    return Cifar10(
        train_batches=tuple(batch.images for batch in ordered),
        train_labels=np.concatenate([batch.labels for batch in ordered]),
        test_images=test.images,
        test_labels=test.labels,
        class_names=class_names,
    )


def _channels_last(planes: np.ndarray) -> np.ndarray:
    """(N, 3072) planes R|G|B of 32x32 as a C-ordered (N, 32, 32, 3) array (one copy)."""
    return np.ascontiguousarray(planes.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


_PYTHON_FILES = {r"data_batch_([1-5])": "train", r"test_batch": "test", r"batches\.meta": "meta"}
_BINARY_FILES = {
    r"data_batch_([1-5])\.bin": "train",
    r"test_batch\.bin": "test",
    r"batches\.meta\.txt": "meta",
}


def _match_file(patterns: dict[str, str], file: str) -> tuple[str, int] | None:
    for pattern, kind in patterns.items():
        match = re.fullmatch(pattern, file)
        if match:
            return kind, int(match.group(1)) if match.groups() else 0
    return None


def _decode_batch(folder: str, data: memoryview, where: str) -> tuple[np.ndarray, np.ndarray]:
    if folder == BINARY_DIR:
        return _decode_binary_batch(data, where)
    return _decode_python_batch(data, where)


def _decode_binary_batch(data: memoryview, where: str) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + PIXELS  # one label byte, then the R, G and B planes
    if len(data) == 0 or len(data) % record:
        raise UnsafeArchiveError(
            f"{where}: {len(data):,} bytes is not a whole number of {record}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return records[:, 1:], records[:, 0].copy()


def _decode_python_batch(data: memoryview, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 channel planes and (N,) uint8 labels."""
    batch = _restricted_unpickle(data, where)
    if not isinstance(batch, dict):
        raise UnsafeArchiveError(f"{where}: expected a dict, found {type(batch).__name__}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise UnsafeArchiveError(f"{where}: the batch has no {key.decode()!r} entry")
    pixels, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else pixels
        raise UnsafeArchiveError(
            f"{where}: 'data' must be a uint8 (N, {PIXELS}) array, found {found}"
        )
    if pixels.shape[1] != PIXELS:
        raise UnsafeArchiveError(
            f"{where}: images have {pixels.shape[1:]} values, expected ({PIXELS},) per image"
        )
    if not isinstance(labels, list) or not all(
        isinstance(label, int) and 0 <= label < 256 for label in labels
    ):
        raise UnsafeArchiveError(f"{where}: 'labels' must be a list of class numbers")
    if len(labels) != len(pixels):
        raise UnsafeArchiveError(
            f"{where}: {len(pixels)} images but {len(labels)} labels; the batch is inconsistent"
        )
    return pixels, np.asarray(labels, dtype=np.uint8)


def _decode_meta(folder: str, data: memoryview, where: str) -> tuple[str, ...]:
    if folder == BINARY_DIR:
        names = [line.strip() for line in bytes(data).decode("ascii", "replace").splitlines()]
    else:
        meta = _restricted_unpickle(data, where)
        if not isinstance(meta, dict) or b"label_names" not in meta:
            raise UnsafeArchiveError(f"{where}: expected a dict with 'label_names'")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    names = [name for name in names if name]
    if len(names) != NUM_CLASSES:
        raise UnsafeArchiveError(f"{where}: expected {NUM_CLASSES} class names, found {names}")
    return tuple(names)


# --- the restricted unpickler -----------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    from numpy._core import multiarray  # NumPy 2's name for numpy.core.multiarray

    reconstruct = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # as written by NumPy 1 / Py 2
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # as written by NumPy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, strings, numbers and uint8 arrays."""

    def __init__(self, file: _ViewReader, where: str) -> None:
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2
        self.where = where
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeArchiveError(
                f"{self.where}: the pickle asks for {module}.{name}, which a CIFAR-10 batch never "
                "needs; refusing to load it (only NumPy arrays are allowed)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeArchiveError(f"{self.where}: the pickle uses persistent ids; refusing it")


class _ViewReader:
    """A file over a memoryview, for the unpickler: io.BytesIO would first copy the whole
    member, holding the GIL that the inflate thread needs."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.position + size)
        data = self.view[self.position : end].tobytes()
        self.position = end
        return data

    def readline(self) -> bytes:
        end = self.position
        while end < len(self.view):  # the pickle's text lines (class names) are short
            piece = self.view[end : end + 4096].tobytes()
            newline = piece.find(b"\n")
            end += len(piece) if newline < 0 else newline + 1
            if newline >= 0:
                break
        return self.read(end - self.position)


def _restricted_unpickle(data: memoryview, where: str) -> Any:
    try:
        return _BatchUnpickler(_ViewReader(data), where).load()
    except UnsafeArchiveError:
        raise
    except Exception as error:  # any malformed pickle: report it as bad data, with its cause
        raise UnsafeArchiveError(
            f"{where}: not a readable CIFAR-10 batch ({type(error).__name__}: {error})"
        ) from error
