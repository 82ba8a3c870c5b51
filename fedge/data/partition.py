"""Split a training set among clients with flwr-datasets' partitioners.

The partitioners run over a light in-memory ``datasets.Dataset`` of labels and row
indices (plus natural ids), never over the samples themselves, so partitioning 60k
labels into 100 clients takes well under a second.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.data.loaders import DataError

PARTITION_KINDS = ("iid", "dirichlet", "pathological", "natural")
PARTITION_FORMS = "iid, dirichlet:ALPHA, pathological:K or natural"
NON_NATURAL_FORMS = "iid, dirichlet:ALPHA or pathological:K"

# Dirichlet draws may leave a client with nothing; rather than resample (flwr-datasets
# gives up after 10 tries and warns on each) we accept any draw and then hand each empty
# partition one sample from the largest one (see _fill_empty_partitions).
DIRICHLET_MIN_PARTITION_SIZE = 0


@dataclass(frozen=True)
class PartitionSpec:
    """How to split the training set among clients.

    Parameters
    ----------
    kind : str
        One of ``PARTITION_KINDS``.
    alpha : float, default 0.0
        Dirichlet concentration (> 0, dirichlet only); small alpha means strong label skew.
    classes_per_client : int, default 0
        Number of distinct labels per client (>= 1, pathological only).
    """

    kind: str
    alpha: float = 0.0
    classes_per_client: int = 0

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "pathological":
            return f"pathological:{self.classes_per_client}"
        return self.kind


def _bad(text: str, reason: str) -> DataError:
    return DataError(f"bad partition {text!r}: {reason}; use {PARTITION_FORMS}")


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA``, ``pathological:K`` or ``natural``.

    Parameters
    ----------
    text : str
        Partition text as given on the command line or in the config.

    Returns
    -------
    PartitionSpec
        The parsed partition.

    Raises
    ------
    DataError
        Unknown kind, missing or extra argument, alpha not a finite number > 0,
        K not an integer >= 1.
    """
    kind, sep, arg = text.strip().partition(":")
    if kind in ("iid", "natural"):
        if sep:
            raise _bad(text, f"{kind} takes no argument")
        return PartitionSpec(kind)
    if kind == "dirichlet":
        if not arg:
            raise _bad(text, "dirichlet needs its concentration, e.g. dirichlet:0.5")
        try:
            alpha = float(arg)
        except ValueError:
            raise _bad(text, f"alpha {arg!r} is not a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise _bad(text, "alpha must be > 0")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "pathological":
        if not arg:
            raise _bad(text, "pathological needs its classes per client, e.g. pathological:2")
        try:
            k = int(arg)
        except ValueError:
            raise _bad(text, f"K {arg!r} is not an integer") from None
        if k < 1:
            raise _bad(text, "K must be >= 1")
        return PartitionSpec("pathological", classes_per_client=k)
    raise _bad(text, f"unknown kind {kind!r}")


def _indices_of(partitioner: Any, num_partitions: int) -> list[np.ndarray]:
    """Sorted int64 row indices (the ``idx`` column) of every partition, the public way.

    One ``load_partition`` per partition: simple, but ``datasets.Dataset.select``
    fingerprints its index list with dill, seconds for 60k scattered rows.
    """
    return [
        np.sort(np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64))
        for pid in range(num_partitions)
    ]


def _assigned_indices(partitioner: Any, num_partitions: int, idx: np.ndarray) -> list[np.ndarray]:
    """Like :func:`_indices_of`, reading the partitioner's assignment without ``select``.

    ``load_partition(0)`` makes the partitioner compute its assignment (public API); the
    assignment itself is the partitioners' ``_partition_id_to_indices`` (rows of the
    table, mapped through ``idx``). If a flwr-datasets release drops that attribute this
    falls back to :func:`_indices_of`; a test checks both give the same partitions.
    """
    partitioner.load_partition(0)
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if not (isinstance(mapping, dict) and sorted(mapping) == list(range(num_partitions))):
        return _indices_of(partitioner, num_partitions)
    return [np.sort(idx[np.asarray(mapping[pid], dtype=np.int64)]) for pid in range(num_partitions)]


def _fill_empty_partitions(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty partition the last index of the currently largest partition.

    Keeps every index exactly once; deterministic given ``parts``.
    """
    out = list(parts)
    for pid, part in enumerate(out):
        if part.size == 0:
            donor = max(range(len(out)), key=lambda i: out[i].size)
            if out[donor].size < 2:
                raise DataError("too few samples to give every client one; lower the number of clients")
            out[pid] = out[donor][-1:]
            out[donor] = out[donor][:-1]
    return out


def partition_indices(
    labels: np.ndarray,
    spec: PartitionSpec,
    num_partitions: int,
    seed: int,
    natural_ids: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split the rows of a training set into ``num_partitions`` client partitions.

    - ``iid``: rows shuffled with ``seed``, then ``IidPartitioner`` cuts contiguous shards
      of ``N // P`` or ``N // P + 1`` rows.
    - ``dirichlet``: ``DirichletPartitioner(partition_by="label", alpha, seed,
      min_partition_size=0, self_balancing=False)`` (Hsu et al. 2019, "Measuring the
      Effects of Non-Identical Data Distribution"); a partition left empty gets one row
      of the largest partition.
    - ``pathological``: ``PathologicalPartitioner(num_classes_per_partition=K,
      class_assignment_mode="first-deterministic", seed)`` (McMahan et al. 2017 shards):
      each client holds at most K labels.
    - ``natural``: ``NaturalIdPartitioner(partition_by="id")`` over the rows of the first
      ``num_partitions`` ids in sorted order; partition k holds exactly the rows of the
      k-th sorted id (rows of later ids belong to no partition).

    Parameters
    ----------
    labels : np.ndarray
        Integer label of each training row, shape ``(N,)``.
    spec : PartitionSpec
        How to split.
    num_partitions : int
        Number of clients P, ``1 <= P <= N``.
    seed : int
        Seed of the partitioner; the same seed gives identical partitions.
    natural_ids : np.ndarray or None, default None
        Natural client id of each row (natural only).

    Returns
    -------
    list of np.ndarray
        P sorted int64 arrays of row indices, disjoint.

    Raises
    ------
    DataError
        P out of range, natural without ids or with fewer ids than P, K larger than
        the number of labels, or a split flwr-datasets cannot make.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}; pass y_train")
    num_rows = labels.size
    if not 1 <= num_partitions <= num_rows:
        raise DataError(
            f"num_partitions={num_partitions} must be between 1 and the number of "
            f"training samples ({num_rows}); choose fewer clients"
        )
    if spec.kind not in PARTITION_KINDS:
        raise DataError(f"unknown partition kind {spec.kind!r}; use {PARTITION_FORMS}")

    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    # The "arrow" format makes `dataset[column]` a pyarrow array, which the partitioners'
    # np.array(...) converts at C speed (the default Column object iterates in Python).
    def table(columns: dict[str, np.ndarray]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(columns).with_format("arrow")

    idx = np.arange(num_rows, dtype=np.int64)
    partitioner: Any
    if spec.kind == "iid":
        shuffled = np.random.default_rng(seed).permutation(num_rows)
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = table({"label": labels[shuffled], "idx": shuffled})
        return _indices_of(partitioner, num_partitions)

    if spec.kind == "dirichlet":
        if not spec.alpha > 0:
            raise DataError(f"dirichlet alpha={spec.alpha} must be > 0; use dirichlet:0.5")
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
            self_balancing=False,
            seed=seed,
        )
        partitioner.dataset = table({"label": labels, "idx": idx})
        return _fill_empty_partitions(_assigned_indices(partitioner, num_partitions, idx))

    if spec.kind == "pathological":
        num_labels = np.unique(labels).size
        if not 1 <= spec.classes_per_client <= num_labels:
            raise DataError(
                f"pathological:{spec.classes_per_client} needs K between 1 and the "
                f"{num_labels} labels of the data; lower K"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
        partitioner.dataset = table({"label": labels, "idx": idx})
        try:
            with warnings.catch_warnings():
                # Fewer clients than labels leaves labels unused: expected, not news.
                warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
                return _assigned_indices(partitioner, num_partitions, idx)
        except ValueError as err:
            message = " ".join(str(err).split())
            raise DataError(f"pathological split failed: {message}") from None

    # natural
    if natural_ids is None:
        raise DataError(
            "natural partition needs natural ids (writer, user, speaker or hospital) and "
            f"this dataset has none; use {NON_NATURAL_FORMS}"
        )
    natural_ids = np.asarray(natural_ids)
    if natural_ids.shape != labels.shape:
        raise DataError(
            f"natural_ids shape {natural_ids.shape} differs from labels {labels.shape}; pass train_ids"
        )
    unique_ids = np.unique(natural_ids)
    if num_partitions > unique_ids.size:
        raise DataError(
            f"natural split has {unique_ids.size} ids but num_partitions={num_partitions}; "
            f"use at most {unique_ids.size} clients"
        )
    keep = np.isin(natural_ids, unique_ids[:num_partitions])
    partitioner = NaturalIdPartitioner(partition_by="id")
    partitioner.dataset = table({"label": labels[keep], "idx": idx[keep], "id": natural_ids[keep]})
    # NaturalIdPartitioner draws a tqdm bar on stderr; keep library users' logs clean.
    with contextlib.redirect_stderr(io.StringIO()):
        return _assigned_indices(partitioner, num_partitions, idx[keep])


def natural_partition_ids(natural_ids: np.ndarray, num_partitions: int) -> np.ndarray:
    """Natural id of each partition of a ``natural`` split: the first P ids in sorted order.

    Parameters
    ----------
    natural_ids : np.ndarray
        Natural id of each training row.
    num_partitions : int
        Number of partitions P.

    Returns
    -------
    np.ndarray
        ``(P,)`` ids; partition k holds the rows whose id is ``result[k]``.
    """
    return np.unique(natural_ids)[:num_partitions]
