"""fedge's datasets and their federated partitions.

``load_dataset`` reads one dataset (cached per process): a built-in one from local files,
or ``hf:<hub id>``, any Hugging Face Hub dataset, through flwr-datasets (``fedge.data.hf``).
``partition_indices`` splits its training rows among clients with flwr-datasets'
partitioners, and ``FederatedData`` / ``federated_data`` give each client its train and
test data lazily.
"""

from fedge.data.federated import FederatedData, federated_data, local_split, take
from fedge.data.hf import HfArrays, hf_default_model, hf_to_arrays, load_hf_dataset
from fedge.data.loaders import (
    DATA_DIR_ENV,
    DATASETS,
    HF_PREFIX,
    LOADERS,
    SPECS,
    ArrayLike,
    DataError,
    DatasetSpec,
    LoadedDataset,
    LocalTraining,
    TokenWindows,
    check_dataset_name,
    is_hf_dataset,
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
    "HF_PREFIX",
    "LOADERS",
    "PARTITION_KINDS",
    "SPECS",
    "ArrayLike",
    "DataError",
    "DatasetSpec",
    "FederatedData",
    "HfArrays",
    "LoadedDataset",
    "LocalTraining",
    "PartitionSpec",
    "TokenWindows",
    "check_dataset_name",
    "federated_data",
    "hf_default_model",
    "hf_to_arrays",
    "is_hf_dataset",
    "load_dataset",
    "load_hf_dataset",
    "local_split",
    "natural_partition_ids",
    "parse_partition",
    "partition_indices",
    "resolve_data_dir",
    "take",
]
