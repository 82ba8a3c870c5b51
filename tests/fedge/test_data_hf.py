"""fedge.data.hf: Hugging Face datasets (``hf:<hub id>``), all offline.

Datasets are built in memory with ``datasets.Dataset.from_dict`` from pixels and values
drawn here; expected arrays are computed from those raw values with plain numpy
(``(pixel / 255 - mean) / std``), never by re-running the conversion. The Hub itself is
never contacted: offline mode, a patched metadata call, or a patched ``FederatedDataset``.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import datasets
import datasets.config
import flwr_datasets
import httpx
import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image

import fedge.data.hf as hf_module
from fedge.data import (
    DATA_DIR_ENV,
    DATASETS,
    SPECS,
    DataError,
    FederatedData,
    check_dataset_name,
    hf_to_arrays,
    load_dataset,
    resolve_data_dir,
)

OFFLINE_LIMIT_S = 20.0


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def image_dataset(pixels: list[np.ndarray], labels: list[int], num_classes: int) -> datasets.Dataset:
    """A split with an ``img`` Image column (PNG-encoded, lossless) and a ClassLabel ``label``."""
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)}
    )
    images = [Image.fromarray(p) for p in pixels]
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


def standardized(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(raw / 255 - mean_c) / std_c`` for raw ``(N, H, W, C)``, as ``(N, C, H, W)``."""
    return ((raw / 255.0 - mean) / std).transpose(0, 3, 1, 2)


@pytest.fixture(autouse=True)
def fresh_hf_cache() -> Iterator[None]:
    """Every test loads its Hub datasets anew (the loader caches per process)."""
    hf_module._load_hf_cached.cache_clear()
    yield
    hf_module._load_hf_cached.cache_clear()


# ----------------------------------------------------------------------------- names


def test_hf_names_are_accepted_without_network_and_builtins_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert check_dataset_name("hf:x/y") is None
    assert check_dataset_name("hf:ylecun/mnist") is None
    assert check_dataset_name("mnist") is SPECS["mnist"]
    assert "hf:x/y" not in DATASETS and all(not name.startswith("hf:") for name in DATASETS)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir("hf:x/y", None) is None
    assert resolve_data_dir("hf:x/y", "/nowhere") is None


@pytest.mark.parametrize("name", ["hf:", "hf:  ", "hf:ylecun/ mnist"])
def test_empty_or_spaced_hf_id_is_a_data_error(name: str) -> None:
    with pytest.raises(DataError) as excinfo:
        check_dataset_name(name)
    assert "hf:ylecun/mnist" in one_line_error(excinfo)


def test_unknown_name_mentions_hf() -> None:
    with pytest.raises(DataError) as excinfo:
        check_dataset_name("foo")
    message = one_line_error(excinfo)
    assert "unknown dataset 'foo'" in message and "digits, mnist" in message and "hf:" in message


# ----------------------------------------------------------------------------- conversion


def test_gray_images_become_standardized_1hw() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = [3, 0, 9, 3, 1, 7]
    ds = image_dataset(list(raw), labels, num_classes=10)
    arrays = hf_to_arrays(ds)
    assert arrays.x.shape == (6, 1, 28, 28) and arrays.x.dtype == np.float32
    assert arrays.y.dtype == np.int64 and arrays.y.tolist() == labels
    assert arrays.num_classes == 10  # the ClassLabel's, not max + 1 = 10 by chance: see RGB test
    assert arrays.input_shape == (1, 28, 28) and arrays.default_model == "cnn28"
    assert arrays.input_columns == ("img",) and arrays.label_column == "label"
    scaled = raw / 255.0
    mean, std = scaled.mean(), scaled.std()
    np.testing.assert_allclose(arrays.mean, [mean], rtol=1e-12)
    np.testing.assert_allclose(arrays.std, [std], rtol=1e-12)
    np.testing.assert_allclose(arrays.x, ((scaled - mean) / std)[:, None], atol=1e-5)


def test_rgb_images_use_per_channel_train_statistics_for_test() -> None:
    rng = np.random.default_rng(1)
    # Channels of different means so a per-image or global statistic would be caught.
    raw_train = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8) // np.array([1, 2, 4], np.uint8)
    raw_test = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    train = hf_to_arrays(image_dataset(list(raw_train), [0, 1, 2, 1, 0], num_classes=100))
    test = hf_to_arrays(
        image_dataset(list(raw_test), [5, 2, 0], num_classes=100), stats=(train.mean, train.std)
    )
    assert train.x.shape == (5, 3, 32, 32) and train.default_model == "cnn32"
    assert train.num_classes == test.num_classes == 100
    mean = (raw_train / 255.0).mean(axis=(0, 1, 2))
    std = (raw_train / 255.0).std(axis=(0, 1, 2))
    assert mean[0] > 1.5 * mean[2]
    np.testing.assert_allclose(train.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(train.std, std, rtol=1e-12)
    np.testing.assert_allclose(train.x, standardized(raw_train, mean, std), atol=1e-5)
    np.testing.assert_allclose(test.x, standardized(raw_test, mean, std), atol=1e-5)
    assert test.y.tolist() == [5, 2, 0] and test.x.dtype == np.float32


def test_gray_images_among_rgb_are_repeated_to_three_channels() -> None:
    gray = np.full((32, 32), 200, dtype=np.uint8)
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 1] = 100
    arrays = hf_to_arrays(image_dataset([gray, rgb], [0, 1], num_classes=2))
    raw = np.stack([np.repeat(gray[..., None], 3, axis=2), rgb])
    mean = (raw / 255.0).mean(axis=(0, 1, 2))
    std = (raw / 255.0).std(axis=(0, 1, 2))
    assert arrays.x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(arrays.x, standardized(raw, mean, std), atol=1e-5)


def test_label_column_fine_label_wins_over_coarse_classlabel() -> None:
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "coarse_label": datasets.ClassLabel(num_classes=2),
            "fine_label": datasets.ClassLabel(num_classes=4),
        }
    )
    pixels = [np.full((8, 8), v, dtype=np.uint8) for v in (0, 255)]
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pixels], "coarse_label": [1, 0], "fine_label": [3, 2]},
        features=features,
    )
    arrays = hf_to_arrays(ds)
    assert arrays.label_column == "fine_label" and arrays.y.tolist() == [3, 2] and arrays.num_classes == 4
    assert arrays.default_model == "cnn8"
    # Two pixel values 0 and 1 in equal numbers: mean 0.5, std 0.5, so x = -1 and +1.
    np.testing.assert_allclose(arrays.x[:, 0], np.stack([np.full((8, 8), -1.0), np.full((8, 8), 1.0)]))


def test_tabular_columns_are_stacked_and_standardized() -> None:
    features = datasets.Features(
        {
            "age": datasets.Value("int32"),
            "name": datasets.Value("string"),
            "chol": datasets.Value("float32"),
            "site": datasets.ClassLabel(num_classes=3),
            "labels": datasets.Value("int64"),
        }
    )
    age = [40, 50, 60, 70]
    chol = [200.0, None, 240.0, 280.0]
    ds = datasets.Dataset.from_dict(
        {"age": age, "name": list("abcd"), "chol": chol, "site": [0, 1, 2, 0], "labels": [0, 4, 1, 4]},
        features=features,
    )
    arrays = hf_to_arrays(ds)
    assert arrays.input_columns == ("age", "chol") and arrays.label_column == "labels"
    assert arrays.x.shape == (4, 2) and arrays.x.dtype == np.float32
    assert arrays.input_shape == (2,) and arrays.default_model == "mlp"
    assert arrays.num_classes == 5 and arrays.y.tolist() == [0, 4, 1, 4]  # no ClassLabel: max + 1
    # age: mean 55, population std sqrt(125); chol over the 3 present values: mean 240,
    # std sqrt(3200 / 3); the missing value takes the mean, i.e. 0 once standardized.
    expected_age = (np.array(age) - 55.0) / np.sqrt(125.0)
    expected_chol = np.array([-40.0, 0.0, 0.0, 40.0]) / np.sqrt(3200.0 / 3.0)
    np.testing.assert_allclose(arrays.x, np.stack([expected_age, expected_chol], axis=1), atol=1e-6)


def test_unsupported_shape_is_a_one_line_error_naming_the_zoo_shapes() -> None:
    ds = image_dataset([np.zeros((5, 5), dtype=np.uint8)] * 2, [0, 1], num_classes=2)
    with pytest.raises(DataError) as excinfo:
        hf_to_arrays(ds, name="hf:x/tiny")
    message = one_line_error(excinfo)
    assert "hf:x/tiny" in message and "(1, 5, 5)" in message
    assert "(1, 28, 28)" in message and "(3, 32, 32)" in message and "(F,)" in message


def test_no_label_column_and_string_labels_are_errors() -> None:
    unlabelled = datasets.Dataset.from_dict({"a": [1.0, 2.0]})
    with pytest.raises(DataError) as excinfo:
        hf_to_arrays(unlabelled)
    assert "no label column" in one_line_error(excinfo)
    text_labels = datasets.Dataset.from_dict({"a": [1.0, 2.0], "label": ["cat", "dog"]})
    with pytest.raises(DataError) as excinfo:
        hf_to_arrays(text_labels)
    assert "integer class id" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- loading offline


def test_offline_load_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(DataError) as excinfo:
        load_dataset("hf:fedge-tests/not-cached-anywhere")
    elapsed_s = time.perf_counter() - start
    message = one_line_error(excinfo)
    assert message.startswith("could not load Hugging Face dataset 'fedge-tests/not-cached-anywhere' (")
    assert "access to the Hugging Face Hub" in message and "--data-dir" in message and "digits" in message
    assert elapsed_s < OFFLINE_LIMIT_S
    assert before == huggingface_hub.constants.HF_HUB_OFFLINE  # flags restored


def test_unreachable_hub_fails_fast_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_network(self: Any, repo_id: str, **kwargs: Any) -> None:
        assert kwargs["timeout"] <= hf_module.HF_PROBE_TIMEOUT_S
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    start = time.perf_counter()
    with pytest.raises(DataError) as excinfo:
        load_dataset("hf:fedge-tests/not-cached-anywhere")
    elapsed_s = time.perf_counter() - start
    message = one_line_error(excinfo)
    assert "(ConnectError: [Errno -2] Name or service not known; not in the local cache" in message
    assert elapsed_s < OFFLINE_LIMIT_S


def test_unknown_id_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    url = "https://huggingface.co/api/datasets/fedge-tests/nope"

    def not_found(self: Any, repo_id: str, **kwargs: Any) -> None:
        response = httpx.Response(404, request=httpx.Request("GET", url))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", not_found)
    with pytest.raises(DataError) as excinfo:
        load_dataset("hf:fedge-tests/nope")
    assert "'fedge-tests/nope' was not found on the Hub" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- FederatedData


class FakeFederatedDataset:
    """Stands in for ``flwr_datasets.FederatedDataset``: serves local splits, records calls."""

    splits: ClassVar[dict[str, datasets.Dataset]] = {}
    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeFederatedDataset.calls.append(kwargs)

    def load_split(self, split: str) -> datasets.Dataset:
        if split not in self.splits:
            raise ValueError(f"The given split: '{split}' is not present in the dataset's splits")
        return self.splits[split]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeFederatedDataset]:
    """Offline mode (no probe, no download) and the fake ``FederatedDataset``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(FakeFederatedDataset, "splits", {})
    monkeypatch.setattr(FakeFederatedDataset, "calls", [])
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    return FakeFederatedDataset


def gray8(num_rows: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 17, size=(num_rows, 8, 8), dtype=np.uint8) * 15
    return raw, [i % 4 for i in range(num_rows)]


def test_federated_data_over_an_hf_dataset(fake_hub: type[FakeFederatedDataset]) -> None:
    raw_train, y_train = gray8(40, seed=0)
    raw_test, y_test = gray8(10, seed=1)
    fake_hub.splits = {
        "train": image_dataset(list(raw_train), y_train, num_classes=4),
        "test": image_dataset(list(raw_test), y_test, num_classes=4),
    }
    fd = FederatedData("hf:fake/digits8", "dirichlet:0.5", 4, seed=0)
    assert fd._spec is None and not fake_hub.calls  # nothing loaded before it is needed
    spec = fd.spec
    assert spec.name == "hf:fake/digits8" and spec.input_shape == (1, 8, 8) and spec.num_classes == 4
    assert spec.default_model == "cnn8" and spec.input_dtype == "float32" and spec.natural_split is None
    (call,) = fake_hub.calls
    assert call["dataset"] == "fake/digits8" and list(call["partitioners"]) == ["train"]
    assert call["partitioners"]["train"].num_partitions == 1
    sizes = fd.partition_sizes()
    assert len(sizes) == 4 and min(sizes) >= 1 and sum(sizes) == 40
    for pid in range(4):
        x, y = fd.client_train(pid)
        assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    x_test_out, y_test_out = fd.central_test()
    x_test = np.asarray(x_test_out)
    scaled = raw_train / 255.0
    np.testing.assert_allclose(x_test[:, 0], (raw_test / 255.0 - scaled.mean()) / scaled.std(), atol=1e-5)
    assert y_test_out.tolist() == y_test
    assert len(fake_hub.calls) == 1  # loaded once per process
    copy = pickle.loads(pickle.dumps(fd))
    assert copy.partition_sizes() == sizes


def test_pathological_works_and_natural_is_refused_before_loading(
    fake_hub: type[FakeFederatedDataset],
) -> None:
    raw, labels = gray8(24, seed=2)
    fake_hub.splits = {
        "train": image_dataset(list(raw), labels, 4),
        "test": image_dataset(list(raw), labels, 4),
    }
    fd = FederatedData("hf:fake/patho", "pathological:2", 3, seed=1)
    for pid in range(3):
        assert np.unique(fd.client_train(pid)[1]).size <= 2
    with pytest.raises(DataError) as excinfo:
        FederatedData("hf:fake/patho", "natural", 3, seed=1)
    assert "has no natural split" in one_line_error(excinfo)
    assert len(fake_hub.calls) == 1


def test_without_test_split_train_is_split_80_20_by_seed(fake_hub: type[FakeFederatedDataset]) -> None:
    raw, labels = gray8(50, seed=3)
    fake_hub.splits = {"train": image_dataset(list(raw), labels, num_classes=4)}
    a = load_dataset("hf:fake/no-test", seed=7)
    assert len(a.y_test) == round(0.2 * 50) and len(a.y_train) == 40
    assert sorted([*a.y_train.tolist(), *a.y_test.tolist()]) == sorted(labels)
    # Statistics come from the 40 training rows only, so those are exactly standardized.
    x_train = np.asarray(a.x_train, dtype=np.float64)
    assert abs(x_train.mean()) < 1e-5 and abs(x_train.std() - 1.0) < 1e-5
    b = load_dataset("hf:fake/no-test", seed=8)
    assert not np.array_equal(a.y_test, b.y_test) or not np.array_equal(
        np.asarray(a.x_test), np.asarray(b.x_test)
    )
    assert load_dataset("hf:fake/no-test", seed=7) is a


@pytest.mark.parametrize("with_test_split", [True, False])
def test_real_federated_dataset_reads_a_local_parquet_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_test_split: bool
) -> None:
    # datasets.load_dataset (under FederatedDataset) takes a local folder as well as a Hub
    # id: this runs the unpatched flwr-datasets path, split lookup included, offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "local-mnist" / "data"
    folder.mkdir(parents=True)
    raw_train = np.random.default_rng(4).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    train = image_dataset(list(raw_train), [i % 3 for i in range(30)], num_classes=3)
    train.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    if with_test_split:
        test = image_dataset(list(raw_train[:10]), [2] * 10, num_classes=3)
        test.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    fd = FederatedData(f"hf:{folder.parent}", "iid", 3, seed=0)
    assert fd.spec.input_shape == (1, 28, 28) and fd.spec.num_classes == 3
    assert fd.spec.default_model == "cnn28"
    x_test, y_test = fd.central_test()
    if with_test_split:
        assert fd.partition_sizes() == [10, 10, 10] and y_test.tolist() == [2] * 10
        scaled = raw_train / 255.0
        expected = (scaled[:10] - scaled.mean()) / scaled.std()
        np.testing.assert_allclose(np.asarray(x_test)[:, 0], expected, atol=1e-5)
    else:
        assert sum(fd.partition_sizes()) == 24 and len(y_test) == 6
