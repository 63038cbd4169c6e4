"""Reads a CIFAR-10 archive (python or binary version) into arrays, without trusting it.

Nothing is extracted to disk: tarfile reads the tar.gz as a stream, which ISA-L inflates on a
thread of its own (`isal.igzip_threaded`) while the members already read are decoded. Each
member is checked (a safe relative path, a regular file, a bounded size) before it is read. The
python version's batches are pickles, so they are read with an unpickler that admits NumPy's
array reconstruction and nothing else (the Python documentation's "restricting globals"): a
hostile archive raises UnsafeArchiveError and runs no code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
from isal import igzip_threaded, isal_zlib

from pipeline.errors import PipelineError

PYTHON_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = 5
PIXELS = 32 * 32 * 3  # one image, channel planes R|G|B of 32x32 each
NUM_CLASSES = 10
MAX_MEMBER_BYTES = 64 * 2**20  # a real batch is 31 MB; anything much larger is not CIFAR-10
MAX_MEMBERS = 100  # the real archives hold 8 or 9 entries
MAX_TAR_BYTES = 8 * MAX_MEMBER_BYTES  # either version inflates to 186 MB
READ_CHUNK = 1 << 20
INFLATE_ERROR = cast(type[Exception], isal_zlib.IsalError)  # its stub calls it an instance

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
class Cifar10:
    """The archive's contents: images channels-last (N, 32, 32, 3) uint8, labels (N,) uint8."""

    train_batches: tuple[np.ndarray, ...]  # data_batch_1..5, in order
    train_labels: np.ndarray  # all training batches' labels, concatenated
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


# --- the tar stream ---------------------------------------------------------------------------


def iter_members(path: Path, max_bytes: int = MAX_TAR_BYTES) -> Iterator[tuple[str, bytes]]:
    """Yields (path inside the archive, content) of each regular file, after safety checks.

    After the last member the rest of the stream is inflated too, so that gzip has checked its
    CRC and length. More than `max_bytes` inflated in all is refused (a decompression bomb).
    """
    if not path.is_file():
        raise UnsafeArchiveError(f"{path}: no such file")
    try:
        with (
            igzip_threaded.open(path, "rb") as stream,
            tarfile.open(fileobj=stream, mode="r|") as archive,
        ):
            inflated = 0
            for count, member in enumerate(archive, start=1):
                if count > MAX_MEMBERS:
                    raise UnsafeArchiveError(f"{path}: more than {MAX_MEMBERS} members")
                name = _checked_name(path, member)
                if member.isdir():
                    continue
                reader = archive.extractfile(member)
                data = reader.read() if reader else b""
                if len(data) != member.size:
                    raise EOFError(f"member {member.name!r} ends after the archive does")
                inflated = _bounded(path, inflated + member.size, max_bytes)
                yield name, data
            while chunk := stream.read(READ_CHUNK):  # padding after the tar's end
                inflated = _bounded(path, inflated + len(chunk), max_bytes)
    except UnsafeArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, INFLATE_ERROR) as error:
        raise UnsafeArchiveError(
            f"{path}: not a readable tar.gz archive ({type(error).__name__}: {error}); "
            "the file is truncated or corrupt: download it again"
        ) from None


def _bounded(path: Path, inflated: int, max_bytes: int) -> int:
    if inflated > max_bytes:
        raise UnsafeArchiveError(
            f"{path}: inflates to more than {max_bytes:,} bytes; CIFAR-10 inflates to 186 MB"
        )
    return inflated


def _checked_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's path inside the archive, if it is a safe folder or regular file."""
    posix = PurePosixPath(member.name)
    if posix.is_absolute() or ".." in posix.parts or "\\" in member.name:
        raise UnsafeArchiveError(
            f"{path}: member {member.name!r} points outside the archive's folder; "
            "refusing the archive"
        )
    if not (member.isdir() or member.isreg()):
        raise UnsafeArchiveError(
            f"{path}: member {member.name!r} is a {_kind(member)}; "
            "only regular files and folders are allowed"
        )
    if member.size > MAX_MEMBER_BYTES:
        raise UnsafeArchiveError(
            f"{path}: member {member.name!r} is {member.size:,} bytes, more than "
            f"the {MAX_MEMBER_BYTES:,} a CIFAR-10 batch can be"
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

_FILES = {
    PYTHON_DIR: {r"data_batch_([1-5])": "train", r"test_batch": "test", r"batches\.meta": "meta"},
    BINARY_DIR: {
        r"data_batch_([1-5])\.bin": "train",
        r"test_batch\.bin": "test",
        r"batches\.meta\.txt": "meta",
    },
}


def load_cifar10(path: Path) -> Cifar10:
    """Decodes either version of the archive; the layout is recognised from its members.

    A batch that a later member of the same name replaces counts as the last one.
    """
    # Images channels-last and labels, by (kind, number). Each batch is transposed as soon as it
    # is decoded, while ISA-L's thread inflates the next one.
    batches: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    class_names: tuple[str, ...] | None = None
    layouts: set[str] = set()
    for name, data in iter_members(path):
        folder, _, file = name.partition("/")
        match = _match_file(folder, file)
        if match is None:
            continue  # readme.html and the like
        layouts.add(folder)
        kind, number = match
        where = f"{path}:{name}"
        if kind == "meta":
            class_names = _decode_meta(folder, data, where)
        else:
            decode = _decode_binary_batch if folder == BINARY_DIR else _decode_python_batch
            planes, labels = decode(data, where)
            batches[kind, number] = channels_last(planes), labels
    if len(layouts) > 1:
        raise UnsafeArchiveError(f"{path}: holds both {PYTHON_DIR}/ and {BINARY_DIR}/; use one")
    if not layouts:
        raise UnsafeArchiveError(
            f"{path}: no CIFAR-10 batches found (expected {PYTHON_DIR}/ or {BINARY_DIR}/)"
        )
    (folder,) = layouts
    wanted = {("train", i): f"data_batch_{i}" for i in range(1, TRAIN_BATCHES + 1)}
    wanted["test", 0] = "test_batch"
    missing = [file for key, file in wanted.items() if key not in batches]
    missing += ["batches.meta"] if class_names is None else []
    if missing:
        raise UnsafeArchiveError(f"{path}: {folder}/ lacks {', '.join(missing)}")
    assert class_names is not None  # narrowed by `missing` above
    for key, file in wanted.items():
        labels = batches[key][1]
        if labels.size and int(labels.max()) >= len(class_names):
            raise UnsafeArchiveError(
                f"{path}: {file} has label {int(labels.max())}, but batches.meta names "
                f"{len(class_names)} classes"
            )
    train = [batches["train", i] for i in range(1, TRAIN_BATCHES + 1)]
    return Cifar10(
        train_batches=tuple(images for images, _ in train),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=batches["test", 0][0],
        test_labels=batches["test", 0][1],
        class_names=class_names,
    )


def channels_last(planes: np.ndarray) -> np.ndarray:
    """(N, 3072) planes R|G|B of 32x32, as stored, as a C-ordered (N, 32, 32, 3) array.

    One channel at a time: each copy reads one plane in order and writes every third byte,
    faster than NumPy's transposing copy of all three at once (0.45 s against 0.55 s for the
    60,000 images here, most of either being the fresh memory's page faults).
    """
    images = np.empty((len(planes), 32, 32, 3), dtype=np.uint8)
    for channel in range(3):
        images.reshape(-1, 1024, 3)[:, :, channel] = planes.reshape(-1, 3, 1024)[:, channel]
    return images


def _match_file(folder: str, file: str) -> tuple[str, int] | None:
    for pattern, kind in _FILES.get(folder, {}).items():
        match = re.fullmatch(pattern, file)
        if match:
            return kind, int(match.group(1)) if match.groups() else 0
    return None


def _decode_binary_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + PIXELS  # one label byte, then the R, G and B planes
    if len(data) == 0 or len(data) % record:
        raise UnsafeArchiveError(
            f"{where}: {len(data):,} bytes is not a whole number of {record}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return records[:, 1:], records[:, 0].copy()


def _decode_python_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
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


def _decode_meta(folder: str, data: bytes, where: str) -> tuple[str, ...]:
    if folder == BINARY_DIR:
        names = [line.strip() for line in data.decode("ascii", "replace").splitlines()]
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


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, strings, numbers and NumPy arrays."""

    def __init__(self, file: io.BytesIO, where: str) -> None:
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2
        self.where = where
        from numpy._core import multiarray  # NumPy 2's name for numpy.core.multiarray

        self.allowed = {
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,  # NumPy 1
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,  # NumPy 2
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

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


def _restricted_unpickle(data: bytes, where: str) -> Any:
    try:
        return _BatchUnpickler(io.BytesIO(data), where).load()
    except UnsafeArchiveError:
        raise
    except Exception as error:  # any malformed pickle: report it as bad data, with its cause
        raise UnsafeArchiveError(
            f"{where}: not a readable CIFAR-10 batch ({type(error).__name__}: {error})"
        ) from error
