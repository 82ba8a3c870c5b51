"""fedge's datasets and their federated partitions, all offline.

``load_dataset`` reads one dataset (cached per process), ``partition_indices`` splits its
training rows among clients with flwr-datasets' partitioners, and ``FederatedData`` /
``federated_data`` give each client its train and test data lazily.
"""

from fedge.data.federated import FederatedData, federated_data, local_split, take
from fedge.data.loaders import (
    DATA_DIR_ENV,
    DATASETS,
    LOADERS,
    SPECS,
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
    PARTITION_KINDS,
    PartitionSpec,
    natural_partition_ids,
    parse_partition,
    partition_indices,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "LOADERS",
    "PARTITION_KINDS",
    "SPECS",
    "ArrayLike",
    "DataError",
    "DatasetSpec",
    "FederatedData",
    "LoadedDataset",
    "PartitionSpec",
    "TokenWindows",
    "check_dataset_name",
    "federated_data",
    "load_dataset",
    "local_split",
    "natural_partition_ids",
    "parse_partition",
    "partition_indices",
    "resolve_data_dir",
    "take",
]
