"""Offline loaders for fedge's datasets: one function per dataset and one dict ``LOADERS``.

Every loader reads the files laid out as ``../shared/datasets`` (see its README) from a
*data root* and returns a :class:`LoadedDataset` of normalized arrays. Nothing is
downloaded and nothing is written. Heavy imports (scikit-learn, Pillow) happen inside the
loader that needs them, so ``import fedge.data`` stays cheap.

``hf:<hub id>`` names any Hugging Face Hub dataset instead; :func:`load_dataset` hands it
to :mod:`fedge.data.hf`, which downloads it into the Hugging Face cache.
"""

from __future__ import annotations

import functools
import gzip
import io
import itertools
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

DATA_DIR_ENV = "FEDGE_DATA_DIR"
"""Environment variable naming the data root when no ``--data-dir`` is given."""

HF_PREFIX = "hf:"
"""Prefix of a Hugging Face Hub dataset name: ``hf:<hub id>``, e.g. ``hf:ylecun/mnist``."""

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
# Per-channel statistics of the CIFAR-10 training pixels in [0, 1] (the exact values,
# not the often-copied (0.2023, 0.1994, 0.2010) std that is a per-image average).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

HAR_WINDOW_LEN = 128
HAR_STRIDE = 64
TEST_FRACTION = 0.2
"""Share of each user's (har) or hospital's (heart) samples, or of all samples (digits),
that goes to the test split."""

SHAKESPEARE_WINDOW_LEN = 80
# LEAF's ALL_LETTERS (leaf/models/utils/language_utils.py): token id = position in it.
SHAKESPEARE_ALPHABET = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SHAKESPEARE_MIN_WINDOWS_PER_SPLIT = 2
"""A speaker is kept only with at least this many windows in both train and test."""

HEART_HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


class DataError(ValueError):
    """Bad data input: message is one line naming the problem and the fix."""


# --------------------------------------------------------------------------------------
# Specs and containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalTraining:
    """Settings of a client's local training: a dataset's defaults, or a run's resolved values.

    Parameters
    ----------
    lr : float
        SGD learning rate.
    batch_size : int
        Mini-batch size.
    local_epochs : int
        Passes over the client's data per round.
    local_steps : int
        Most optimizer steps per round, whatever ``local_epochs`` says; 0 means no cap.
    grad_clip_norm : float
        Each mini-batch gradient's global L2 norm is clipped to this before the step;
        0 means no clipping. A guard against exploding gradients, not a privacy
        mechanism (that clips per-sample gradients or the update).

    The defaults are digits' (and any ``hf:`` dataset's) settings.
    """

    lr: float = 0.05
    batch_size: int = 8
    local_epochs: int = 5
    local_steps: int = 0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset, available without loading it.

    Parameters
    ----------
    name : str
        Dataset name, one of ``DATASETS`` or ``hf:<hub id>``.
    num_classes : int
        Number of labels; labels are ``0 .. num_classes - 1``.
    input_shape : tuple of int
        Shape of one sample ``x[i]``.
    input_dtype : str
        ``"float32"`` or ``"int64"`` (token ids, shakespeare).
    default_model : str
        Name of the model fedge picks for ``model = "auto"``.
    natural_split : str or None
        What a natural partition groups by (``"writer"``, ``"user"``, ``"speaker"``,
        ``"hospital"``), or None when the dataset has no natural clients.
    vocab_size : int, default 0
        Number of token ids (shakespeare only).
    training : LocalTraining, default LocalTraining()
        The local-training settings ``auto`` stands for (``lr``, ``batch-size``,
        ``local-epochs``, ``local-steps``, ``grad-clip-norm``), measured for
        ``default_model`` on this dataset (README, "Datasets").
    central_test_size : int, default 0
        Most test samples the server's central evaluation uses, an even stride over the
        test split (``FederatedData.central_test``); 0 means all of them.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    default_model: str
    natural_split: str | None
    vocab_size: int = 0
    training: LocalTraining = LocalTraining()
    central_test_size: int = 0


class TokenWindows:
    """Lazy ``(N, window_len)`` int64 array of next-character windows over one code array.

    Millions of overlapping 80-character windows would take gigabytes as an int64
    matrix; this keeps one uint8 array of all token ids and one int64 start offset per
    window, and materializes only the rows asked for.

    Parameters
    ----------
    codes : np.ndarray
        1-D uint8 token ids of the concatenated texts.
    starts : np.ndarray
        1-D int64 offset into ``codes`` of each window's first token. Window ``i`` is
        ``codes[starts[i] : starts[i] + window_len]``.
    window_len : int
        Tokens per window.

    Notes
    -----
    ``x[i]`` with an int returns shape ``(window_len,)``; a slice, an index array or a
    boolean mask returns ``(k, window_len)``, as numpy does. ``np.asarray(x)``
    materializes everything: use it on a client's subset, not on millions of windows.
    """

    ndim = 2

    def __init__(self, codes: np.ndarray, starts: np.ndarray, window_len: int) -> None:
        if codes.ndim != 1 or starts.ndim != 1:
            raise DataError("TokenWindows needs 1-D codes and 1-D starts; flatten them first")
        if starts.size and (starts.min() < 0 or starts.max() + window_len > codes.size):
            raise DataError("TokenWindows starts run past the codes; check the window offsets")
        self._codes = codes
        self._starts = starts.astype(np.int64, copy=False)
        self._offsets = np.arange(window_len, dtype=np.int64)
        self.window_len = window_len

    def __len__(self) -> int:
        return int(self._starts.size)

    @property
    def shape(self) -> tuple[int, int]:
        """``(number of windows, window_len)``."""
        return (len(self), self.window_len)

    @property
    def dtype(self) -> np.dtype[Any]:
        """Always int64 (token ids)."""
        return np.dtype(np.int64)

    @property
    def starts(self) -> np.ndarray:
        """Read-only view of the window start offsets."""
        view = self._starts.view()
        view.flags.writeable = False
        return view

    def __getitem__(self, key: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        starts = self._starts[key]
        return self._codes[starts[..., None] + self._offsets].astype(np.int64)

    def subset(self, indices: np.ndarray | slice) -> TokenWindows:
        """Return the windows at ``indices`` as another lazy ``TokenWindows`` (no copy of codes).

        Parameters
        ----------
        indices : np.ndarray or slice
            Integer indices, boolean mask or slice into this object.

        Returns
        -------
        TokenWindows
            Lazy windows sharing this object's code array.
        """
        return TokenWindows(self._codes, np.atleast_1d(self._starts[indices]), self.window_len)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"TokenWindows(shape={self.shape}, dtype=int64)"


ArrayLike: TypeAlias = np.ndarray | TokenWindows
"""Sample array of a split: a numpy array, or lazy :class:`TokenWindows` (shakespeare)."""


@dataclass(frozen=True, eq=False)
class LoadedDataset:
    """One dataset's normalized train and test splits.

    Parameters
    ----------
    spec : DatasetSpec
        Description of the dataset.
    x_train, x_test : ArrayLike
        Samples, ``(N, *spec.input_shape)`` of ``spec.input_dtype``.
    y_train, y_test : np.ndarray
        int64 labels ``(N,)``.
    train_ids, test_ids : np.ndarray or None
        Natural client id (writer, user, speaker, hospital) of each sample.
    x_unseen, y_unseen : ArrayLike or None
        femnist only: samples of writers that have no training data.
    """

    spec: DatasetSpec
    x_train: ArrayLike
    y_train: np.ndarray
    x_test: ArrayLike
    y_test: np.ndarray
    train_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None
    x_unseen: ArrayLike | None = None
    y_unseen: np.ndarray | None = None


_ONE_EPOCH_OF_32 = LocalTraining(lr=0.05, batch_size=32, local_epochs=1)

SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, (1, 8, 8), "float32", "cnn8", None),
    # 1,200 images a client (50 clients): one epoch of batch 32 is 38 steps, digits' 5 epochs
    # of batch 8 would be 750 a round.
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), "float32", "cnn28", None, training=_ONE_EPOCH_OF_32),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        10,
        (1, 28, 28),
        "float32",
        "cnn28",
        None,
        training=_ONE_EPOCH_OF_32,
    ),
    "femnist": DatasetSpec(
        "femnist",
        62,
        (1, 28, 28),
        "float32",
        "cnn28",
        "writer",
        training=LocalTraining(lr=0.05, batch_size=16, local_epochs=2),
    ),
    # Without clipping, lr 0.05 with momentum 0.9 sent most HAR clients' losses to NaN.
    "har": DatasetSpec(
        "har",
        12,
        (6, HAR_WINDOW_LEN),
        "float32",
        "har1d",
        "user",
        training=LocalTraining(lr=0.05, batch_size=16, local_epochs=2, grad_clip_norm=1.0),
    ),
    # A speaker has ~4,600 windows (up to 26k): the step cap, not epochs, bounds a round.
    "shakespeare": DatasetSpec(
        "shakespeare",
        len(SHAKESPEARE_ALPHABET),
        (SHAKESPEARE_WINDOW_LEN,),
        "int64",
        "chargru",
        "speaker",
        vocab_size=len(SHAKESPEARE_ALPHABET),
        training=LocalTraining(lr=0.5, batch_size=32, local_epochs=1, local_steps=50, grad_clip_norm=1.0),
        central_test_size=10_000,
    ),
    "heart": DatasetSpec("heart", 2, (13,), "float32", "mlp", "hospital", training=LocalTraining(lr=0.01)),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), "float32", "cnn32", None, training=_ONE_EPOCH_OF_32),
}

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "digits": (),
    "mnist": tuple(f"mnist/{n}" for n in _IDX_NAMES),
    "fashion-mnist": tuple(f"fashion-mnist/{n}" for n in _IDX_NAMES),
    "femnist": ("femnist_leaf/femnist_leaf_subset.npz",),
    "har": ("hapt_smartphone_har/hapt_raw_50hz_by_user.npz",),
    "shakespeare": ("shakespeare_oss/oss_shakespeare_by_speaker.json.gz",),
    "heart": tuple(f"heart_disease_uci/processed.{h}.data" for h in HEART_HOSPITALS),
    "cifar10": ("cifar10_jpeg/cifar10_jpegs.bin", "cifar10_jpeg/cifar10_jpegs_index.npz"),
}
"""Files (relative to the data root) each dataset reads."""


def builtin_choices() -> str:
    """The built-in dataset names, comma separated (for error messages)."""
    return ", ".join(SPECS)


def is_hf_dataset(name: str) -> bool:
    """Whether ``name`` names a Hugging Face Hub dataset (``hf:<hub id>``)."""
    return name.startswith(HF_PREFIX)


def check_dataset_name(name: str) -> DatasetSpec | None:
    """Check a dataset name without reading any file or touching the network.

    Parameters
    ----------
    name : str
        One of ``DATASETS``, or ``hf:<hub id>`` for any Hugging Face Hub dataset.

    Returns
    -------
    DatasetSpec or None
        The built-in dataset's description; None for an ``hf:`` dataset, whose shape
        and classes are known only once it is loaded (``load_dataset(name).spec``).

    Raises
    ------
    DataError
        If ``name`` is neither a built-in name nor ``hf:`` followed by an id without
        whitespace.
    """
    if is_hf_dataset(name):
        hub_id = name[len(HF_PREFIX) :]
        if not hub_id or any(char.isspace() for char in hub_id):
            raise DataError(
                f"bad Hugging Face dataset {name!r}: write hf: then the Hub id without spaces, "
                "e.g. hf:ylecun/mnist"
            )
        return None
    if name not in SPECS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of: {builtin_choices()}, or hf:<hub id> "
            "for a Hugging Face dataset (e.g. hf:ylecun/mnist)"
        )
    return SPECS[name]


def resolve_data_dir(dataset: str, data_dir: str | None) -> Path | None:
    """Find the data root for ``dataset`` and check that its files are there.

    Parameters
    ----------
    dataset : str
        Dataset name.
    data_dir : str or None
        Root folder holding the per-dataset folders (``mnist/``, ``femnist_leaf/``, ...),
        laid out like ``../shared/datasets``. Empty or None: ``$FEDGE_DATA_DIR``.

    Returns
    -------
    Path or None
        The absolute data root, or None for ``digits`` (bundled with scikit-learn) and
        ``hf:`` datasets (downloaded to the Hugging Face cache, ``$HF_HOME``; ``data_dir``
        is ignored).

    Raises
    ------
    DataError
        Unknown dataset, no folder given, or a missing folder or file (named exactly).
    """
    if check_dataset_name(dataset) is None or not REQUIRED_FILES[dataset]:
        return None
    text = data_dir or os.environ.get(DATA_DIR_ENV, "")
    if not text:
        raise DataError(
            f"dataset {dataset!r} needs its files: pass --data-dir DIR or set "
            f"{DATA_DIR_ENV} (e.g. ../shared/datasets)"
        )
    root = Path(text).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"data dir '{root}' does not exist; pass --data-dir DIR or set {DATA_DIR_ENV} "
            "to the folder that holds mnist/, femnist_leaf/, ... (e.g. ../shared/datasets)"
        )
    for rel in REQUIRED_FILES[dataset]:
        path = root / rel
        if not path.is_file():
            raise DataError(
                f"dataset {dataset!r} needs the file '{path}', which is missing; point "
                f"--data-dir or {DATA_DIR_ENV} at a folder laid out like ../shared/datasets"
            )
    return root


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _need_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root; call resolve_data_dir first")
    return root


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes (LeCun's MNIST format).

    The header is big-endian: two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then one uint32 per dimension; the data follow.

    Parameters
    ----------
    path : Path
        ``*.gz`` IDX file.

    Returns
    -------
    np.ndarray
        uint8 array of the shape the header declares (read-only buffer).

    Raises
    ------
    DataError
        If the file is not a uint8 IDX file or is truncated.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DataError(f"'{path}' is too short to be an IDX file; re-download it")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"'{path}' is not a uint8 IDX file (header {zero}, {dtype_code})")
    header_bytes = 4 + 4 * ndim
    shape = struct.unpack(">" + "I" * ndim, data[4:header_bytes])
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_bytes)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"'{path}' holds {arr.size} values, header says {shape}; re-download it")
    return arr.reshape(shape)


def pixel_lut(mean: float, std: float) -> np.ndarray:
    """float32 table ``lut[p] = (p / 255 - mean) / std`` for every byte value ``p``.

    Indexing it with uint8 pixels normalizes without float temporaries.
    """
    return ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)


def _standardize_gray(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``x = (pixels / 255 - mean) / std`` as float32 ``(N, 1, H, W)``."""
    return pixel_lut(mean, std)[pixels][:, None, :, :]


def _split_per_group(
    groups: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test inside each group (sorted group order).

    Each group of ``n`` samples gives ``round(test_fraction * n)`` test samples, drawn
    by ``rng``; both returned index arrays are sorted.
    """
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        num_test = round(test_fraction * members.size)
        test_parts.append(members[:num_test])
        train_parts.append(members[num_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


# --------------------------------------------------------------------------------------
# Loaders: (root, seed) -> LoadedDataset
# --------------------------------------------------------------------------------------


def load_digits(root: Path | None, seed: int) -> LoadedDataset:
    """scikit-learn's bundled 8x8 digits: ``x = pixels / 16``, stratified 80/20 split by ``seed``.

    Parameters
    ----------
    root : Path or None
        Ignored (the data ship with scikit-learn).
    seed : int
        Seed of the train/test split.

    Returns
    -------
    LoadedDataset
        1,797 samples, float32 ``(N, 1, 8, 8)`` in [0, 1].
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    return LoadedDataset(SPECS["digits"], x_train, y_train, x_test, y_test)


def _load_idx_dataset(name: str, root: Path | None, mean: float, std: float) -> LoadedDataset:
    folder = _need_root(name, root) / name
    x_train = read_idx(folder / "train-images-idx3-ubyte.gz")
    y_train = read_idx(folder / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    return LoadedDataset(
        SPECS[name],
        _standardize_gray(x_train, mean, std),
        y_train.astype(np.int64),
        _standardize_gray(x_test, mean, std),
        y_test.astype(np.int64),
    )


def load_mnist(root: Path | None, seed: int) -> LoadedDataset:
    """MNIST, official 60k/10k split: ``x = (pixel / 255 - 0.1307) / 0.3081``.

    Parameters
    ----------
    root : Path
        Data root holding ``mnist/``.
    seed : int
        Unused (the split is fixed).

    Returns
    -------
    LoadedDataset
        float32 ``(N, 1, 28, 28)``.
    """
    return _load_idx_dataset("mnist", root, MNIST_MEAN, MNIST_STD)


def load_fashion_mnist(root: Path | None, seed: int) -> LoadedDataset:
    """Fashion-MNIST, official 60k/10k split: ``x = (pixel / 255 - 0.2860) / 0.3530``.

    Parameters
    ----------
    root : Path
        Data root holding ``fashion-mnist/``.
    seed : int
        Unused (the split is fixed).

    Returns
    -------
    LoadedDataset
        float32 ``(N, 1, 28, 28)``.
    """
    return _load_idx_dataset("fashion-mnist", root, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def load_femnist(root: Path | None, seed: int) -> LoadedDataset:
    """FEMNIST (LEAF subset), split by writer, ink made high like MNIST.

    The files store 255 for the white background, so ``ink = (255 - pixel) / 255`` and
    ``x = (ink - 0.1307) / 0.3081`` (MNIST's statistics). Ids are the writer indices of
    the file (positions in its ``writer_ids``), int64. The 240 writers with test data
    only are ``x_unseen`` / ``y_unseen``.

    Parameters
    ----------
    root : Path
        Data root holding ``femnist_leaf/``.
    seed : int
        Unused (LEAF's split is fixed).

    Returns
    -------
    LoadedDataset
        float32 ``(N, 1, 28, 28)``, 62 classes, 300 writers in train and test.
    """
    path = _need_root("femnist", root) / REQUIRED_FILES["femnist"][0]
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}

    def images(key: str) -> np.ndarray:
        return _standardize_gray(255 - arrays[key], MNIST_MEAN, MNIST_STD)

    return LoadedDataset(
        SPECS["femnist"],
        images("x_train"),
        arrays["y_train"].astype(np.int64),
        images("x_test"),
        arrays["y_test"].astype(np.int64),
        train_ids=arrays["writer_train"].astype(np.int64),
        test_ids=arrays["writer_test"].astype(np.int64),
        x_unseen=images("x_unseen"),
        y_unseen=arrays["y_unseen"].astype(np.int64),
    )


def har_window_starts(user: np.ndarray, session: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Start offsets of the single-activity windows of the raw HAPT stream.

    Windows of ``HAR_WINDOW_LEN`` samples with stride ``HAR_STRIDE`` (50% overlap) are
    laid inside each contiguous run of equal ``(user, session)``; a window is kept when
    its labels are all equal and >= 1 (labelled).

    Parameters
    ----------
    user, session, label : np.ndarray
        Per-sample user id, session id and label (-1 unlabelled).

    Returns
    -------
    np.ndarray
        Sorted int64 start offsets.
    """
    change = np.flatnonzero((user[1:] != user[:-1]) | (session[1:] != session[:-1])) + 1
    run_bounds = np.concatenate([[0], change, [user.size]])
    candidates = np.concatenate(
        [
            np.arange(start, end - HAR_WINDOW_LEN + 1, HAR_STRIDE, dtype=np.int64)
            for start, end in itertools.pairwise(run_bounds)
        ]
    )
    window_labels = label[candidates[:, None] + np.arange(HAR_WINDOW_LEN)]
    keep = (window_labels.min(axis=1) == window_labels.max(axis=1)) & (window_labels[:, 0] >= 1)
    return candidates[keep]


def load_har(root: Path | None, seed: int) -> LoadedDataset:
    """UCI HAPT smartphone activities: 6-channel 128-sample windows, split by user.

    ``x[i]`` is ``(6, 128)``: accelerometer x, y, z then gyroscope x, y, z, each channel
    standardized with the mean and std of the training windows. Class = label - 1
    (12 classes: 6 activities, 6 transitions). Each user's windows are split 80/20 with
    ``seed``, so every user has train and test windows; ids are the users (1-30).

    Parameters
    ----------
    root : Path
        Data root holding ``hapt_smartphone_har/``.
    seed : int
        Seed of the per-user train/test split.

    Returns
    -------
    LoadedDataset
        About 10k windows, float32 ``(N, 6, 128)``.
    """
    path = _need_root("har", root) / REQUIRED_FILES["har"][0]
    with np.load(path, allow_pickle=False) as npz:
        signals = np.concatenate([npz["acc"], npz["gyro"]], axis=1).astype(np.float32)
        label = npz["label"].astype(np.int64)
        user = npz["user"].astype(np.int64)
        session = npz["session"].astype(np.int64)
    starts = har_window_starts(user, session, label)
    # (windows, time, channel) -> channels first
    x = signals[starts[:, None] + np.arange(HAR_WINDOW_LEN)].transpose(0, 2, 1)
    y = label[starts] - 1
    ids = user[starts]
    train, test = _split_per_group(ids, TEST_FRACTION, np.random.default_rng(seed))
    # float64 statistics: a float32 sum over ~1M values drifts by 1e-3 of the std.
    mean = x[train].mean(axis=(0, 2), keepdims=True, dtype=np.float64)
    std = x[train].std(axis=(0, 2), keepdims=True, dtype=np.float64)
    x = np.ascontiguousarray((x - mean) / std, dtype=np.float32)
    return LoadedDataset(
        SPECS["har"], x[train], y[train], x[test], y[test], train_ids=ids[train], test_ids=ids[test]
    )


def encode_shakespeare(text: str) -> np.ndarray:
    """Token ids of ``text`` in LEAF's 80-character alphabet, as uint8.

    ``"\\n"`` becomes the space (LEAF replaces line breaks by spaces), and so does any
    character outside the alphabet (in the OSS files only two backslashes).

    Parameters
    ----------
    text : str
        Raw text.

    Returns
    -------
    np.ndarray
        uint8 ids, one per character.
    """
    space_id = SHAKESPEARE_ALPHABET.index(" ")
    lut = np.full(128, space_id, dtype=np.uint8)
    for token_id, char in enumerate(SHAKESPEARE_ALPHABET):
        lut[ord(char)] = token_id
    lut[ord("\n")] = space_id
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return np.where(codepoints < lut.size, lut[np.minimum(codepoints, lut.size - 1)], space_id)


def shakespeare_split_sizes(num_chars: int) -> tuple[int, int]:
    """Train and test window counts of one speaker's text (LEAF style, by time).

    A text of ``num_chars`` characters has ``n = num_chars - 80`` windows (each predicts
    the next character); the first ``floor(4 n / 5)`` train, the rest test.

    Parameters
    ----------
    num_chars : int
        Length of the speaker's text.

    Returns
    -------
    tuple of int
        ``(num_train, num_test)``, both 0 for texts of 80 characters or fewer.
    """
    num_windows = max(num_chars - SHAKESPEARE_WINDOW_LEN, 0)
    num_train = (num_windows * 4) // 5
    return num_train, num_windows - num_train


def load_shakespeare(root: Path | None, seed: int) -> LoadedDataset:
    """Shakespeare by (work, speaker), LEAF-style next-character prediction.

    Every 80-character window predicts the next character; per speaker the first 80% of
    windows train and the last 20% test. Speakers with fewer than
    ``SHAKESPEARE_MIN_WINDOWS_PER_SPLIT`` windows in either part are dropped. Ids are the
    kept speakers' positions in sorted user-key order (int64, 0-based). ``x`` is lazy
    :class:`TokenWindows`.

    Parameters
    ----------
    root : Path
        Data root holding ``shakespeare_oss/``.
    seed : int
        Unused (the split is by time).

    Returns
    -------
    LoadedDataset
        int64 token windows ``(N, 80)``, labels in ``0..79``.
    """
    path = _need_root("shakespeare", root) / REQUIRED_FILES["shakespeare"][0]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        users: dict[str, str] = json.load(f)["users"]
    texts: list[str] = []
    train_starts: list[np.ndarray] = []
    test_starts: list[np.ndarray] = []
    offset = 0
    for key in sorted(users):
        text = users[key]
        num_train, num_test = shakespeare_split_sizes(len(text))
        if min(num_train, num_test) < SHAKESPEARE_MIN_WINDOWS_PER_SPLIT:
            continue
        texts.append(text)
        train_starts.append(offset + np.arange(num_train, dtype=np.int64))
        test_starts.append(offset + num_train + np.arange(num_test, dtype=np.int64))
        offset += len(text)
    codes = encode_shakespeare("".join(texts))
    train_ids = np.repeat(np.arange(len(texts), dtype=np.int64), [s.size for s in train_starts])
    test_ids = np.repeat(np.arange(len(texts), dtype=np.int64), [s.size for s in test_starts])
    x_train = TokenWindows(codes, np.concatenate(train_starts), SHAKESPEARE_WINDOW_LEN)
    x_test = TokenWindows(codes, np.concatenate(test_starts), SHAKESPEARE_WINDOW_LEN)
    y_train = codes[x_train.starts + SHAKESPEARE_WINDOW_LEN].astype(np.int64)
    y_test = codes[x_test.starts + SHAKESPEARE_WINDOW_LEN].astype(np.int64)
    return LoadedDataset(SPECS["shakespeare"], x_train, y_train, x_test, y_test, train_ids, test_ids)


def _read_heart_file(path: Path) -> np.ndarray:
    rows = [
        [np.nan if cell.strip() == "?" else float(cell) for cell in line.split(",")]
        for line in path.read_text(encoding="ascii").splitlines()
        if line.strip()
    ]
    table = np.asarray(rows, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 14:
        raise DataError(f"'{path}' should have 14 comma-separated columns; re-download it")
    return table


def load_heart(root: Path | None, seed: int) -> LoadedDataset:
    """UCI Heart Disease from 4 hospitals (cross-silo), binary target ``num > 0``.

    Each hospital's rows are split 80/20 with ``seed``. Missing values (``?``) take the
    median of that column over all training rows; then every column is standardized
    with the training mean and std (a constant column keeps std 1). Ids are the
    hospitals 0-3 in the order cleveland, hungarian, switzerland, va.

    Parameters
    ----------
    root : Path
        Data root holding ``heart_disease_uci/``.
    seed : int
        Seed of the per-hospital train/test split.

    Returns
    -------
    LoadedDataset
        920 rows in all, float32 ``(N, 13)``.
    """
    folder = _need_root("heart", root) / "heart_disease_uci"
    tables = [_read_heart_file(folder / f"processed.{h}.data") for h in HEART_HOSPITALS]
    table = np.concatenate(tables)
    ids = np.repeat(np.arange(len(tables), dtype=np.int64), [t.shape[0] for t in tables])
    x = table[:, :13]
    y = (table[:, 13] > 0).astype(np.int64)
    train, test = _split_per_group(ids, TEST_FRACTION, np.random.default_rng(seed))
    median = np.nanmedian(x[train], axis=0)
    x = np.where(np.isnan(x), median, x)
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = ((x - mean) / std).astype(np.float32)
    return LoadedDataset(
        SPECS["heart"],
        x[train],
        y[train],
        x[test],
        y[test],
        train_ids=ids[train],
        test_ids=ids[test],
    )


def load_cifar10(root: Path | None, seed: int) -> LoadedDataset:
    """CIFAR-10 from the packed JPEGs (quality 75), official 50k/10k split.

    ``x = (pixel / 255 - mean_c) / std_c`` per RGB channel with ``CIFAR10_MEAN`` and
    ``CIFAR10_STD``. Rows keep the files' order, which is sorted by class: shuffle before
    taking a prefix.

    Parameters
    ----------
    root : Path
        Data root holding ``cifar10_jpeg/``.
    seed : int
        Unused (the split is fixed).

    Returns
    -------
    LoadedDataset
        float32 ``(N, 3, 32, 32)``.
    """
    from PIL import Image

    folder = _need_root("cifar10", root) / "cifar10_jpeg"
    with np.load(folder / "cifar10_jpegs_index.npz", allow_pickle=False) as npz:
        offsets = npz["offset"].astype(np.int64)
        lengths = npz["length"].astype(np.int64)
        split = npz["split"]
        label = npz["label"].astype(np.int64)
    blob = (folder / "cifar10_jpegs.bin").read_bytes()
    pixels = np.empty((offsets.size, 32, 32, 3), dtype=np.uint8)
    for i, (start, length) in enumerate(zip(offsets.tolist(), lengths.tolist(), strict=True)):
        with Image.open(io.BytesIO(blob[start : start + length])) as image:
            pixels[i] = np.asarray(image.convert("RGB"))
    luts = [pixel_lut(m, sd) for m, sd in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)]

    def normalize(part: np.ndarray) -> np.ndarray:
        x = np.empty((part.shape[0], 3, 32, 32), dtype=np.float32)
        for channel, lut in enumerate(luts):
            x[:, channel] = lut[part[..., channel]]
        return x

    is_train = split == 0
    return LoadedDataset(
        SPECS["cifar10"],
        normalize(pixels[is_train]),
        label[is_train],
        normalize(pixels[~is_train]),
        label[~is_train],
    )


LOADERS: dict[str, Callable[[Path | None, int], LoadedDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "femnist": load_femnist,
    "har": load_har,
    "shakespeare": load_shakespeare,
    "heart": load_heart,
    "cifar10": load_cifar10,
}
"""Dataset name -> loader ``(data root, seed) -> LoadedDataset``."""

DATASETS: tuple[str, ...] = tuple(LOADERS)

# Loaders whose output depends on the seed; the others are cached once per data root.
_SEEDED = frozenset({"digits", "har", "heart"})


@functools.cache
def _load_cached(name: str, root: Path | None, seed: int) -> LoadedDataset:
    return LOADERS[name](root, seed)


def load_dataset(name: str, data_dir: str | None = None, seed: int = 42) -> LoadedDataset:
    """Load a dataset once per process (cached by name, resolved data root and seed).

    Parameters
    ----------
    name : str
        One of ``DATASETS``, or ``hf:<hub id>`` for a Hugging Face Hub dataset (see
        :func:`fedge.data.hf.load_hf_dataset`).
    data_dir : str or None, default None
        Data root (see :func:`resolve_data_dir`); None or empty: ``$FEDGE_DATA_DIR``.
        Ignored for ``hf:`` datasets.
    seed : int, default 42
        Seed of the train/test split for datasets without an official one
        (digits, har, heart, ``hf:`` datasets without a ``test`` split); the others
        ignore it and are loaded once for all seeds.

    Returns
    -------
    LoadedDataset
        The cached, shared dataset: treat its arrays as read-only.

    Raises
    ------
    DataError
        Unknown name, missing files, or an ``hf:`` dataset that cannot be loaded
        (Hub unreachable, unknown id, unusable data).
    """
    if check_dataset_name(name) is None:
        from fedge.data.hf import load_hf_dataset

        return load_hf_dataset(name[len(HF_PREFIX) :], seed)
    root = resolve_data_dir(name, data_dir)
    return _load_cached(name, root, seed if name in _SEEDED else 0)
