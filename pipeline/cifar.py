"""Reads a CIFAR-10 archive (python or binary version) into arrays, without trusting it.

Nothing is extracted to disk: members are streamed out of the tar.gz, checked (a safe relative
path, a regular file, a bounded size) and decoded in memory. The python version's batches are
pickles, so they are read with an unpickler that admits NumPy's array reconstruction and nothing
else: a hostile archive raises UnsafeArchiveError and runs no code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

import numpy as np
from isal import igzip, isal_zlib  # ISA-L: inflates CIFAR-10 in 0.55 s, zlib in 1.1 s

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
class Cifar10:
    """The archive's contents, kept as the batches' (N, 3072) uint8 channel planes.

    Images come out channels-last (N, 32, 32, 3), as TensorFlow's CPU kernels want them, through
    `train_images(indices)` and `test_images()`: one copy straight from the planes to the result.
    """

    train_batches: tuple[np.ndarray, ...]  # data_batch_1..5, in order
    train_labels: np.ndarray  # uint8 (N,), all training batches concatenated
    test_batch: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def train_images(self, indices: np.ndarray) -> np.ndarray:
        """The training images at `indices` (ascending), as a C-ordered (k, 32, 32, 3) array."""
        if np.any(np.diff(indices) <= 0):
            raise ValueError("indices must be strictly ascending")
        out = np.empty((len(indices), *IMAGE_SHAPE), dtype=np.uint8)
        start = 0  # first training image of the current batch
        for planes in self.train_batches:
            lo, hi = np.searchsorted(indices, [start, start + len(planes)])
            # Gather whole rows (fast, contiguous), then transpose once into the result.
            out[lo:hi] = _channels_last(planes[indices[lo:hi] - start])
            start += len(planes)
        return out

    def test_images(self) -> np.ndarray:
        return np.ascontiguousarray(_channels_last(self.test_batch))


def _channels_last(planes: np.ndarray) -> np.ndarray:
    """(N, 3072) planes R|G|B of 32x32 as a (N, 32, 32, 3) view, without copying."""
    return planes.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


# --- the tar stream ---------------------------------------------------------------------------


def iter_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yields (path inside the archive, content) of each regular file, after safety checks.

    After the last member the stream is read to its end, so gzip's CRC and length are checked.
    """
    try:
        with (
            _open_stream(path) as raw,
            tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as archive,
        ):
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
                stream = archive.extractfile(member)
                if stream is None:  # pragma: no cover - isreg() members always have a stream
                    raise UnsafeArchiveError(f"{path}: cannot read member {member.name!r}")
                yield name, stream.read()
            while raw.read(CHUNK):  # the tar's end padding, then gzip's CRC and length check
                pass
    except FileNotFoundError:
        raise UnsafeArchiveError(f"{path}: no such file") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, _IsalError) as error:
        raise UnsafeArchiveError(
            f"{path}: not a readable tar.gz archive ({type(error).__name__}: {error}); "
            "the file is truncated or corrupt: download it again"
        ) from None


def _open_stream(path: Path) -> BinaryIO:
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


def load_cifar10(path: Path) -> Cifar10:
    """Decodes either version of the archive; the layout is recognised from its members."""
    train: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    test: tuple[np.ndarray, np.ndarray] | None = None
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
            elif kind == "test":
                test = _decode_batch(folder, data, where)
            else:
                train[index] = _decode_batch(folder, data, where)
        except UnsafeArchiveError:
            # Garbled bytes may be the symptom of a corrupt stream: say so if that is the cause.
            for _ in members:
                pass
            raise
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
    for labels, where in [(b[1], f"data_batch_{i}") for i, b in train.items()] + [
        (test[1], "test_batch")
    ]:
        if labels.size and int(labels.max()) >= len(class_names):
            raise UnsafeArchiveError(
                f"{path}: {where} has label {int(labels.max())}, but batches.meta names "
                f"{len(class_names)} classes"
            )
    ordered = [train[i] for i in range(1, TRAIN_BATCHES + 1)]
    return Cifar10(
        train_batches=tuple(planes for planes, _ in ordered),
        train_labels=np.concatenate([labels for _, labels in ordered]),
        test_batch=test[0],
        test_labels=test[1],
        class_names=class_names,
    )


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


def _decode_batch(folder: str, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if folder == BINARY_DIR:
        return _decode_binary_batch(data, where)
    return _decode_python_batch(data, where)


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

    def __init__(self, file: BinaryIO, where: str) -> None:
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


def _restricted_unpickle(data: bytes, where: str) -> Any:
    try:
        return _BatchUnpickler(io.BytesIO(data), where).load()
    except UnsafeArchiveError:
        raise
    except Exception as error:  # any malformed pickle: report it as bad data, with its cause
        raise UnsafeArchiveError(
            f"{where}: not a readable CIFAR-10 batch ({type(error).__name__}: {error})"
        ) from error
