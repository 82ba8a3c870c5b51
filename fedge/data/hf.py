"""Any Hugging Face dataset as a fedge dataset: ``hf:<hub id>`` through flwr-datasets.

``load_hf_dataset`` downloads a dataset with flwr-datasets' ``FederatedDataset`` (which
uses the ``datasets`` library and its cache, ``$HF_HOME``), and the pure
:func:`hf_to_arrays` turns each split into fedge's normalized arrays. Partitioning stays
fedge's own (:func:`fedge.data.partition_indices` on the converted labels), so ``iid``,
``dirichlet:A`` and ``pathological:K`` work as for the built-in datasets; Hub datasets
have no natural split.

The heavy imports (``datasets``, ``flwr_datasets``, ``huggingface_hub``, Pillow) happen
inside the functions, so ``import fedge.data`` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.data.loaders import (
    HF_PREFIX,
    TEST_FRACTION,
    DataError,
    DatasetSpec,
    LoadedDataset,
    builtin_choices,
)

if TYPE_CHECKING:
    import datasets

LABEL_COLUMNS = ("label", "labels", "fine_label")
"""Label column names tried in this order before falling back to the first ``ClassLabel``."""

HF_DEFAULT_MODELS: dict[tuple[int, ...], str] = {
    (1, 28, 28): "cnn28",
    (1, 8, 8): "cnn8",
    (3, 32, 32): "cnn32",
}
"""Image shape ``(C, H, W)`` -> the zoo model fedge picks; 1-D ``(F,)`` inputs take ``mlp``."""

HF_PROBE_TIMEOUT_S = 10.0
"""Timeout of the one metadata request that checks the Hub is reachable before loading.

``huggingface_hub`` retries a failed connection five times with sleeps of 1, 2, 4, 8
and 8 s (about 25 s offline, not configurable by environment variable); one short probe
without retries tells an unreachable Hub in well under a second when name resolution
fails, and in at most this timeout when packets are dropped.
"""

GRAY_IMAGE_MODES = frozenset({"1", "L", "LA"})
"""PIL modes decoded as one 8-bit gray channel; every other mode is decoded as 8-bit RGB."""

_OFFLINE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
_NUMERIC_KINDS = ("b", "i", "u", "f")
_IMAGE_BATCH_ROWS = 1024
_MAX_REASON_CHARS = 300
# One Hub load at a time: it toggles the libraries' process-wide offline flags, and two
# threads asking for the same dataset should download and decode it once.
_HF_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class HfArrays:
    """One Hugging Face split converted to fedge's arrays, with what the spec needs.

    Parameters
    ----------
    x : np.ndarray
        float32 samples, ``(N, C, H, W)`` for images, ``(N, F)`` for tabular data.
    y : np.ndarray
        int64 labels ``(N,)``.
    num_classes : int
        The label ``ClassLabel``'s ``num_classes``, else ``max(y) + 1``.
    input_shape : tuple of int
        Shape of one sample, ``x.shape[1:]``.
    default_model : str
        Zoo model for that shape (see ``HF_DEFAULT_MODELS``; ``mlp`` for 1-D).
    mean, std : np.ndarray
        float64 statistics used to standardize, one per channel (images, of
        ``pixel / 255``) or per feature (tabular); pass them as ``stats`` to convert
        another split of the same dataset the same way.
    input_columns : tuple of str
        The image column, or the numeric columns stacked in this order.
    label_column : str
        The label column.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    default_model: str
    mean: np.ndarray
    std: np.ndarray
    input_columns: tuple[str, ...]
    label_column: str


# --------------------------------------------------------------------------------------
# Pure conversion
# --------------------------------------------------------------------------------------


def hf_default_model(input_shape: tuple[int, ...], name: str = "the dataset") -> str:
    """The zoo model fedge picks for samples of ``input_shape``.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one sample.
    name : str, default "the dataset"
        Dataset named in the error message.

    Returns
    -------
    str
        ``cnn28`` for (1, 28, 28), ``cnn8`` for (1, 8, 8), ``cnn32`` for (3, 32, 32),
        ``mlp`` for any 1-D (F,).

    Raises
    ------
    DataError
        For any other shape, naming the shapes the zoo takes.
    """
    if input_shape in HF_DEFAULT_MODELS:
        return HF_DEFAULT_MODELS[input_shape]
    if len(input_shape) == 1 and input_shape[0] >= 1:
        return "mlp"
    shapes = ", ".join(str(s) for s in HF_DEFAULT_MODELS)
    raise DataError(
        f"{name} has inputs of shape {input_shape}, which no model in fedge's zoo takes; "
        f"the zoo takes images of shape {shapes} (C, H, W) or 1-D feature vectors (F,), "
        "so choose a dataset with such inputs"
    )


def _value_kind(feature: Any) -> str:
    """numpy kind (``b``, ``i``, ``u``, ``f``, ...) of a scalar ``Value`` feature, else ``""``."""
    import datasets

    if not isinstance(feature, datasets.Value):
        return ""
    try:
        return str(np.dtype(feature.dtype).kind)
    except TypeError:  # "string", "timestamp[s]", ...: not a numpy dtype
        return ""


def _label_column(features: Any, name: str) -> str:
    import datasets

    for column in LABEL_COLUMNS:
        if column in features:
            return column
    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return column
    raise DataError(
        f"{name} has no label column (one of {', '.join(LABEL_COLUMNS)} or a ClassLabel "
        f"feature; columns: {', '.join(features)}); fedge trains classifiers, so choose a "
        "labelled classification dataset"
    )


def _labels(ds: datasets.Dataset, column: str, name: str) -> tuple[np.ndarray, int | None]:
    """int64 labels of ``column`` and the ``ClassLabel``'s class count (None if not one)."""
    import datasets
    import pyarrow as pa

    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        declared: int | None = int(feature.num_classes)
    elif _value_kind(feature) in ("b", "i", "u"):
        declared = None
    else:
        raise DataError(
            f"{name}'s label column {column!r} is {feature!r}; fedge needs one integer class "
            "id per sample (a ClassLabel or integer column)"
        )
    values = ds.with_format("arrow")[column]
    if values.null_count:
        raise DataError(f"{name}'s label column {column!r} has {values.null_count} missing labels")
    y = np.asarray(values.cast(pa.int64()).to_numpy(), dtype=np.int64)
    if y.size and y.min() < 0:
        raise DataError(
            f"{name}'s label column {column!r} holds negative labels (e.g. -1 for unlabelled "
            "rows); fedge needs labels 0 .. num_classes - 1"
        )
    if declared is not None and y.size and y.max() >= declared:
        raise DataError(
            f"{name}'s label column {column!r} holds label {y.max()} but its ClassLabel has "
            f"{declared} classes"
        )
    return y, declared


def _decode_images(ds: datasets.Dataset, column: str, name: str) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` pixels; gray images become RGB when the split mixes both."""
    arrays: list[np.ndarray] = []
    for batch in ds.select_columns([column]).iter(batch_size=_IMAGE_BATCH_ROWS):
        for image in batch[column]:
            if image is None:
                raise DataError(f"{name}'s image column {column!r} has a missing image")
            if image.mode in GRAY_IMAGE_MODES:
                arrays.append(np.asarray(image.convert("L"))[:, :, None])
            else:
                arrays.append(np.asarray(image.convert("RGB")))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        some = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise DataError(
            f"{name}'s images have {len(sizes)} different sizes ({some}, ...); fedge needs "
            "one size per dataset, so choose a dataset of equally sized images"
        )
    num_channels = max(a.shape[2] for a in arrays)
    if num_channels == 3:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return np.stack(arrays)


def _pixel_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``pixels / 255`` over all images, from exact histograms.

    ``mean_c = sum_v count_c(v) * v / 255 / n`` and
    ``std_c = sqrt(sum_v count_c(v) * (v / 255 - mean_c)^2 / n)`` (population std); a
    constant channel gets std 1.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(pixels.shape[-1]):
        counts = np.bincount(pixels[..., channel].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = counts @ levels / total
        std = float(np.sqrt(counts @ (levels - mean) ** 2 / total))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return np.asarray(means), np.asarray(stds)


def _standardize_pixels(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 ``(N, C, H, W)`` with ``x[:, c] = (pixels[..., c] / 255 - mean_c) / std_c``."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    x = np.empty((pixels.shape[0], pixels.shape[3], *pixels.shape[1:3]), dtype=np.float32)
    for channel in range(pixels.shape[3]):
        lut = ((levels - mean[channel]) / std[channel]).astype(np.float32)
        x[:, channel] = lut[pixels[..., channel]]
    return x


def _tabular(ds: datasets.Dataset, columns: list[str]) -> np.ndarray:
    """float64 ``(N, F)`` of the numeric ``columns``; missing values are NaN."""
    import pyarrow as pa

    table = ds.with_format("arrow")
    return np.stack(
        [np.asarray(table[c].cast(pa.float64()).to_numpy(), dtype=np.float64) for c in columns],
        axis=1,
    )


def hf_to_arrays(
    ds: datasets.Dataset,
    *,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
    name: str = "the dataset",
) -> HfArrays:
    """Convert one split of a Hugging Face dataset to fedge's float32 samples and int64 labels.

    - Label: the first of ``label``, ``labels``, ``fine_label`` present, else the first
      ``ClassLabel`` feature; ``num_classes`` is the ``ClassLabel``'s, else ``max + 1``.
    - Input: the first ``Image`` feature, decoded with Pillow to 8-bit gray (modes 1, L,
      LA) as ``(1, H, W)`` or RGB (any other mode) as ``(3, H, W)``, then
      ``x[:, c] = (pixel / 255 - mean_c) / std_c``. Without an image feature, every
      numeric scalar column other than the label (``ClassLabel`` columns excluded, as
      they are often another labelling, e.g. CIFAR-100's ``coarse_label``) is stacked
      in column order into ``(F,)`` and standardized per feature,
      ``x = (v - mean_f) / std_f``; a missing value becomes 0 (the mean).

    Parameters
    ----------
    ds : datasets.Dataset
        One split (not modified).
    stats : tuple of np.ndarray or None, default None
        ``(mean, std)`` to standardize with, from the training split's
        :class:`HfArrays`; None: computed from ``ds`` itself (population std over all
        samples; a constant channel or feature gets std 1).
    name : str, default "the dataset"
        Dataset named in error messages.

    Returns
    -------
    HfArrays
        Samples, labels and the fields of a :class:`DatasetSpec`.

    Raises
    ------
    DataError
        No label column, non-integer or negative labels, no image and no numeric column,
        images of different sizes, ``stats`` of the wrong length, an empty split, or an
        input shape no zoo model takes (see :func:`hf_default_model`).
    """
    import datasets

    if len(ds) == 0:
        raise DataError(f"{name} has an empty split; choose a dataset with samples in train and test")
    features = ds.features
    label_column = _label_column(features, name)
    y, declared_classes = _labels(ds, label_column, name)
    image_columns = [c for c, f in features.items() if isinstance(f, datasets.Image) and c != label_column]
    if image_columns:
        input_columns = image_columns[:1]
        pixels = _decode_images(ds, input_columns[0], name)
        mean, std = stats if stats is not None else _pixel_stats(pixels)
        width = pixels.shape[3]
    else:
        # A ClassLabel is no Value, so other labellings (coarse_label) are left out.
        input_columns = [
            c for c, f in features.items() if c != label_column and _value_kind(f) in _NUMERIC_KINDS
        ]
        if not input_columns:
            raise DataError(
                f"{name} has neither an Image feature nor numeric columns besides its label "
                f"(columns: {', '.join(features)}); fedge takes image or tabular datasets"
            )
        values = _tabular(ds, input_columns)
        if stats is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: mean 0, std 1
                mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            mean = np.where(np.isfinite(mean), mean, 0.0)
            std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        else:
            mean, std = stats
        width = values.shape[1]
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (width,) or std.shape != (width,):
        raise DataError(
            f"{name}: stats for {mean.shape} channels or features, the data have {width}; "
            "pass the stats of a split of the same dataset"
        )
    if image_columns:
        x = _standardize_pixels(pixels, mean, std)
    else:
        x = np.nan_to_num((values - mean) / std, nan=0.0).astype(np.float32)
    input_shape = tuple(int(d) for d in x.shape[1:])
    return HfArrays(
        x=x,
        y=y,
        num_classes=declared_classes if declared_classes is not None else int(y.max()) + 1,
        input_shape=input_shape,
        default_model=hf_default_model(input_shape, name),
        mean=mean,
        std=std,
        input_columns=tuple(input_columns),
        label_column=label_column,
    )


# --------------------------------------------------------------------------------------
# Loading from the Hub
# --------------------------------------------------------------------------------------


def _env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set now.

    Read at call time: the libraries read them once at import, so a variable set later
    (by a test, a notebook) would otherwise be ignored.
    """
    return any(
        os.environ.get(var, "").strip().upper() in _OFFLINE_VALUES
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@contextlib.contextmanager
def _libraries_offline(offline: bool) -> Iterator[None]:
    """Put ``huggingface_hub`` and ``datasets`` in offline mode (cache only) for the block.

    Both keep the flag as a module constant read at import; this sets it and restores
    the previous values afterwards. With ``offline`` False nothing is touched.
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    targets = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved = [(module, attr, getattr(module, attr)) for module, attr in targets if hasattr(module, attr)]
    try:
        for module, attr, _ in saved:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unreachable(hub_id: str, reason: str) -> DataError:
    return DataError(
        f"could not load Hugging Face dataset {hub_id!r} ({reason}); this machine needs access "
        f"to the Hugging Face Hub (or the dataset in its cache, $HF_HOME), or use a built-in "
        f"dataset ({builtin_choices()}) with --data-dir"
    )


def _probe_hub(hub_id: str) -> BaseException | None:
    """Ask the Hub for the dataset's metadata once, without retries.

    Returns
    -------
    BaseException or None
        None if the Hub answered; the error if it could not be reached.

    Raises
    ------
    DataError
        If the Hub answered that no such dataset exists (or it is private).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(hub_id, timeout=HF_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return None  # metadata of a gated dataset is public; the load says what to do
    except RepositoryNotFoundError as err:
        raise DataError(
            f"Hugging Face dataset {hub_id!r} was not found on the Hub ({_one_line(err)}); check "
            f"the id at https://huggingface.co/datasets/{hub_id}, or log in (hf auth login) if "
            "it is private"
        ) from None
    except Exception as err:  # network errors differ across httpx / requests versions
        return err
    return None


def _split_rows(num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 80/20 split: ``round(TEST_FRACTION * n)`` random rows test, the rest train."""
    perm = np.random.default_rng(seed).permutation(num_rows)
    num_test = round(TEST_FRACTION * num_rows)
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def _fingerprint(*parts: object) -> str:
    # Given to Dataset.select so that it does not hash (with dill) tens of thousands of indices.
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _fetch_splits(hub_id: str, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and test ``datasets.Dataset`` of ``hub_id``, through ``FederatedDataset``.

    A dataset without a ``test`` split is split 80/20 with ``seed``.
    """
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    # One trivial partition: fedge partitions the converted labels itself. No shuffle:
    # the rows keep the Hub's order, and the partitioners shuffle with fedge's seed.
    fds = FederatedDataset(dataset=hub_id, partitioners={"train": IidPartitioner(1)}, shuffle=False)
    train = fds.load_split("train")
    try:
        test = fds.load_split("test")
    except ValueError:
        # The dataset is prepared by now, so the only ValueError left is "no such split".
        train_rows, test_rows = _split_rows(len(train), seed)
        test = train.select(test_rows, new_fingerprint=_fingerprint(hub_id, seed, "test"))
        train = train.select(train_rows, new_fingerprint=_fingerprint(hub_id, seed, "train"))
    return train, test


@functools.cache
def _load_hf_cached(hub_id: str, seed: int) -> LoadedDataset:
    name = f"{HF_PREFIX}{hub_id}"
    offline = _env_offline()
    probe_error = None if offline else _probe_hub(hub_id)
    try:
        with _libraries_offline(offline or probe_error is not None):
            train, test = _fetch_splits(hub_id, seed)
    except DataError:
        raise
    except Exception as err:
        if probe_error is not None:
            reason = f"{_one_line(probe_error)}; not in the local cache either"
        elif offline:
            reason = f"{_one_line(err)}; HF_HUB_OFFLINE is set and it is not in the local cache"
        else:
            reason = _one_line(err)
        raise _unreachable(hub_id, reason) from None
    train_arrays = hf_to_arrays(train, name=name)
    test_arrays = hf_to_arrays(test, stats=(train_arrays.mean, train_arrays.std), name=name)
    if test_arrays.input_shape != train_arrays.input_shape:
        raise DataError(
            f"{name}'s test inputs have shape {test_arrays.input_shape}, its train inputs "
            f"{train_arrays.input_shape}; choose a dataset whose splits agree"
        )
    spec = DatasetSpec(
        name=name,
        num_classes=max(train_arrays.num_classes, test_arrays.num_classes),
        input_shape=train_arrays.input_shape,
        input_dtype="float32",
        default_model=train_arrays.default_model,
        natural_split=None,
    )
    return LoadedDataset(spec, train_arrays.x, train_arrays.y, test_arrays.x, test_arrays.y)


def load_hf_dataset(hub_id: str, seed: int) -> LoadedDataset:
    """Load a Hugging Face Hub dataset once per process (cached by id and seed).

    Before downloading, one metadata request (timeout ``HF_PROBE_TIMEOUT_S``, no retries)
    checks that the Hub is reachable; if it is not, or ``HF_HUB_OFFLINE`` /
    ``HF_DATASETS_OFFLINE`` is set, the dataset is read from the local ``datasets`` cache
    only, so an offline machine fails in about a second instead of retrying for ~25 s.

    Parameters
    ----------
    hub_id : str
        Dataset id on the Hub, e.g. ``ylecun/mnist`` (without the ``hf:`` prefix).
    seed : int
        Seed of the 80/20 train/test split of datasets that have no ``test`` split.

    Returns
    -------
    LoadedDataset
        float32 samples standardized with the training split's statistics (see
        :func:`hf_to_arrays`), int64 labels, spec named ``hf:<hub id>`` with no natural
        split. Shared: treat its arrays as read-only.

    Raises
    ------
    DataError
        One line: the Hub unreachable and the dataset not cached, an unknown id, or data
        fedge cannot use (see :func:`hf_to_arrays`).
    """
    with _HF_LOCK:
        return _load_hf_cached(hub_id, seed)
