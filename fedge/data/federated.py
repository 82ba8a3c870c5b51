"""One client's view of a partitioned dataset: :class:`FederatedData` and its cached factory."""

from __future__ import annotations

import functools
import math
import threading
from pathlib import Path

import numpy as np

from fedge.data.loaders import (
    ArrayLike,
    DataError,
    DatasetSpec,
    LoadedDataset,
    TokenWindows,
    check_dataset_name,
    load_dataset,
    resolve_data_dir,
)
from fedge.data.partition import (
    NON_NATURAL_FORMS,
    PartitionSpec,
    natural_partition_ids,
    parse_partition,
    partition_indices,
)
from fedge.rng import Stream, stream_rng, stream_seed


def take(x: ArrayLike, indices: np.ndarray) -> ArrayLike:
    """Rows ``indices`` of ``x``: a numpy copy, or lazy windows for :class:`TokenWindows`.

    Parameters
    ----------
    x : ArrayLike
        Samples of a split.
    indices : np.ndarray
        int64 row indices.

    Returns
    -------
    ArrayLike
        Same kind as ``x``.
    """
    if isinstance(x, TokenWindows):
        return x.subset(indices)
    return x[indices]


def local_split(
    indices: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's row indices into local train and local test.

    ``num_test = min(n - 1, max(1, round(test_fraction * n)))`` for ``n >= 2`` (both
    parts non-empty); a one-row partition keeps its row for training and has no test.

    Parameters
    ----------
    indices : np.ndarray
        The client's row indices.
    test_fraction : float
        Share of rows for local test, in ``(0, 1)``.
    rng : np.random.Generator
        Draws which rows go to test.

    Returns
    -------
    tuple of np.ndarray
        ``(train, test)`` sorted, disjoint, together equal to ``indices``.
    """
    n = indices.size
    if n < 2:
        return np.sort(indices), indices[:0]
    num_test = min(n - 1, max(1, round(test_fraction * n)))
    shuffled = rng.permutation(indices)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


class FederatedData:
    """A dataset split among ``num_partitions`` clients, as each client and the server see it.

    Lazy: the dataset is loaded and the partition map computed on first use, once per
    object (and the load is shared per process through :func:`load_dataset`'s cache).
    Names, partition text and files are checked eagerly, which is cheap. An ``hf:``
    dataset's :attr:`spec` is known only after loading, so reading it loads the dataset.

    Parameters
    ----------
    dataset : str
        One of ``DATASETS``, or ``hf:<hub id>`` for a Hugging Face Hub dataset.
    partition : str
        ``iid``, ``dirichlet:ALPHA``, ``pathological:K`` or ``natural``.
    num_partitions : int
        Number of clients (>= 1).
    seed : int
        Seed of the train/test split (where the dataset has none), the partition and
        the local test split.
    data_dir : str or None, default None
        Data root; None or empty: ``$FEDGE_DATA_DIR``.
    local_test_fraction : float, default 0.0
        In ``[0, 1)``: share of each client's partition held out as its local test set,
        used only when the split has no natural test data of its own.

    Raises
    ------
    DataError
        Unknown dataset, bad partition, natural on a dataset without natural split,
        bad counts or fractions, missing files.

    Notes
    -----
    ``client_test`` returns, in order of preference: the client's own test samples
    (natural split of a dataset with test ids: same writer/user/speaker/hospital); a
    seeded local split of its partition when ``local_test_fraction > 0`` (then
    ``client_train`` excludes those rows); else the client's training data itself.
    """

    def __init__(
        self,
        dataset: str,
        partition: str,
        num_partitions: int,
        seed: int,
        data_dir: str | None = None,
        local_test_fraction: float = 0.0,
    ) -> None:
        self._name = dataset
        # None for an hf: dataset until it is loaded (see the spec property).
        self._spec: DatasetSpec | None = check_dataset_name(dataset)
        self._partition = parse_partition(partition)
        # Hub datasets carry no natural client ids, so natural is refused before loading.
        natural_split = None if self._spec is None else self._spec.natural_split
        if self._partition.kind == "natural" and natural_split is None:
            raise DataError(f"dataset {dataset!r} has no natural split; use {NON_NATURAL_FORMS}")
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
            raise DataError(f"num_partitions must be an int, got {num_partitions!r}")
        if num_partitions < 1:
            raise DataError(f"num_partitions={num_partitions} must be >= 1; use 1 or more clients")
        if not (math.isfinite(local_test_fraction) and 0.0 <= local_test_fraction < 1.0):
            raise DataError(f"local_test_fraction={local_test_fraction} must be in [0, 1); e.g. 0.2")
        root: Path | None = resolve_data_dir(dataset, data_dir)
        self._data_dir = str(root) if root is not None else None
        self._num_partitions = num_partitions
        self._seed = seed
        self._local_test_fraction = local_test_fraction
        self._lock = threading.Lock()
        self._data: LoadedDataset | None = None
        self._train_parts: list[np.ndarray] = []
        self._test_parts: list[np.ndarray] | None = None  # rows of x_test (natural)
        self._local_test_parts: list[np.ndarray] | None = None  # rows of x_train (local split)

    @property
    def spec(self) -> DatasetSpec:
        """The dataset's description: no loading for built-in datasets; ``hf:`` ones load first.

        Raises
        ------
        DataError
            If an ``hf:`` dataset cannot be loaded.
        """
        if self._spec is None:
            self._spec = load_dataset(self._name, self._data_dir, self._seed).spec
        return self._spec

    @property
    def partition(self) -> PartitionSpec:
        """The parsed partition."""
        return self._partition

    @property
    def num_partitions(self) -> int:
        """Number of clients."""
        return self._num_partitions

    def _ensure(self) -> LoadedDataset:
        with self._lock:
            if self._data is not None:
                return self._data
            data = load_dataset(self._name, self._data_dir, self._seed)
            self._spec = data.spec
            # Named streams of the run seed (fedge.rng): the partition and each client's
            # local split never share draws with each other or with sampling.
            parts = partition_indices(
                data.y_train,
                self._partition,
                self._num_partitions,
                stream_seed(self._seed, Stream.PARTITION),
                data.train_ids,
            )
            if self._partition.kind == "natural" and data.test_ids is not None:
                assert data.train_ids is not None
                ids = natural_partition_ids(data.train_ids, self._num_partitions)
                self._test_parts = [np.flatnonzero(data.test_ids == i) for i in ids]
            elif self._local_test_fraction > 0:
                train_parts, test_parts = [], []
                for pid, part in enumerate(parts):
                    # One stream per (seed, client): a client's split never depends on P's order.
                    rng = stream_rng(self._seed, Stream.LOCAL_TEST_SPLIT, pid)
                    train, test = local_split(part, self._local_test_fraction, rng)
                    train_parts.append(train)
                    test_parts.append(test)
                parts, self._local_test_parts = train_parts, test_parts
            self._train_parts = parts
            self._data = data
            return data

    def _check_id(self, partition_id: int) -> None:
        if not 0 <= partition_id < self._num_partitions:
            raise DataError(
                f"partition_id={partition_id} is out of range; use 0 to {self._num_partitions - 1}"
            )

    def client_train(self, partition_id: int) -> tuple[ArrayLike, np.ndarray]:
        """Training samples and labels of one client.

        Parameters
        ----------
        partition_id : int
            Client index, ``0 <= partition_id < num_partitions``.

        Returns
        -------
        tuple
            ``(x, y)``: x of ``spec.input_shape`` rows (lazy windows for shakespeare),
            y int64.

        Raises
        ------
        DataError
            If ``partition_id`` is out of range.
        """
        self._check_id(partition_id)
        data = self._ensure()
        rows = self._train_parts[partition_id]
        return take(data.x_train, rows), data.y_train[rows]

    def client_test(self, partition_id: int) -> tuple[ArrayLike, np.ndarray]:
        """Evaluation samples and labels of one client (see the class Notes for which).

        Parameters
        ----------
        partition_id : int
            Client index, ``0 <= partition_id < num_partitions``.

        Returns
        -------
        tuple
            ``(x, y)`` as :meth:`client_train`.

        Raises
        ------
        DataError
            If ``partition_id`` is out of range.
        """
        self._check_id(partition_id)
        data = self._ensure()
        if self._test_parts is not None:
            rows = self._test_parts[partition_id]
            return take(data.x_test, rows), data.y_test[rows]
        if self._local_test_parts is not None and self._local_test_parts[partition_id].size:
            rows = self._local_test_parts[partition_id]
        else:
            rows = self._train_parts[partition_id]
        return take(data.x_train, rows), data.y_train[rows]

    def central_test(self) -> tuple[ArrayLike, np.ndarray]:
        """The server's evaluation split: the dataset's test split, or an even sample of it.

        A dataset whose spec sets ``central_test_size`` (shakespeare: 908k windows, minutes
        of a GRU per round) is evaluated on every ``ceil(N / central_test_size)``-th test
        sample, a fixed stride that keeps every speaker's share and needs no random draw.

        Returns
        -------
        tuple
            ``(x_test, y_test)`` (shared, treat as read-only).
        """
        # No partitioning needed: the server evaluates on the test split, and skipping it
        # spares the server flwr-datasets' import (seconds, with seaborn).
        data = load_dataset(self._name, self._data_dir, self._seed)
        limit = data.spec.central_test_size
        if not limit or len(data.y_test) <= limit:
            return data.x_test, data.y_test
        rows = np.arange(0, len(data.y_test), -(-len(data.y_test) // limit))
        return take(data.x_test, rows), data.y_test[rows]

    def partition_sizes(self) -> list[int]:
        """Number of training samples of each client (what :meth:`client_train` returns).

        Returns
        -------
        list of int
            One count per partition; with a local test split, its rows are excluded.
        """
        self._ensure()
        return [int(part.size) for part in self._train_parts]

    def __getstate__(self) -> dict[str, object]:
        # Pickled (e.g. to a Ray actor or a worker process): send the arguments only; the
        # receiving process loads and partitions again, through its own caches.
        state = self.__dict__.copy()
        del state["_lock"]
        state.update(_data=None, _train_parts=[], _test_parts=None, _local_test_parts=None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"FederatedData({self._name!r}, {str(self._partition)!r}, "
            f"num_partitions={self._num_partitions}, seed={self._seed})"
        )


@functools.cache
def federated_data(
    dataset: str,
    partition: str,
    num_partitions: int,
    seed: int,
    data_dir: str | None = None,
    local_test_fraction: float = 0.0,
) -> FederatedData:
    """One shared :class:`FederatedData` per process per arguments.

    Client apps call this on every message; the object (and its loaded data and
    partition map) is built once.

    Parameters
    ----------
    dataset, partition, num_partitions, seed, data_dir, local_test_fraction
        As :class:`FederatedData`.

    Returns
    -------
    FederatedData
        The cached object.
    """
    return FederatedData(dataset, partition, num_partitions, seed, data_dir, local_test_fraction)
