"""fedge.data: dataset sizes against published numbers, partitions, errors, client views.

Expected numbers come from the datasets' README and publications (MNIST's label counts,
CIFAR-10's 5,000 / 1,000 per class, UCI's rows per hospital) or from independent
recounts over the raw files, never from re-running the loaders.
"""

from __future__ import annotations

import gzip
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

import fedge.data.partition as partition_module
from fedge.data import (
    DATA_DIR_ENV,
    DATASETS,
    LOADERS,
    PARTITION_KINDS,
    SPECS,
    DataError,
    FederatedData,
    PartitionSpec,
    TokenWindows,
    federated_data,
    load_dataset,
    local_split,
    parse_partition,
    partition_indices,
    resolve_data_dir,
)

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
LEAF_ALPHABET = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


@pytest.fixture
def root() -> str:
    """The shared datasets folder as a string; skips when it is absent."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"shared datasets folder not found at {DATA_ROOT} (clone shared/ beside the repo)")
    return str(DATA_ROOT)


def dense(x: object) -> np.ndarray:
    """The sample array as a numpy array (every dataset but shakespeare)."""
    assert isinstance(x, np.ndarray)
    return x


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- names


def test_dataset_names_specs_and_loaders_agree() -> None:
    assert DATASETS == (
        "digits",
        "mnist",
        "fashion-mnist",
        "femnist",
        "har",
        "shakespeare",
        "heart",
        "cifar10",
    )
    assert set(LOADERS) == set(SPECS) == set(DATASETS)
    assert PARTITION_KINDS == ("iid", "dirichlet", "pathological", "natural")
    models = {name: SPECS[name].default_model for name in DATASETS}
    assert models == {
        "digits": "cnn8",
        "mnist": "cnn28",
        "fashion-mnist": "cnn28",
        "femnist": "cnn28",
        "har": "har1d",
        "shakespeare": "chargru",
        "heart": "mlp",
        "cifar10": "cnn32",
    }
    assert SPECS["shakespeare"].vocab_size == 80 and SPECS["shakespeare"].input_dtype == "int64"


# ----------------------------------------------------------------------------- loaders


def test_digits_is_bundled_and_split_80_20_stratified() -> None:
    data = load_dataset("digits", None, seed=3)
    assert resolve_data_dir("digits", None) is None
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert len(data.y_train) + len(data.y_test) == 1797
    assert len(data.y_test) == math.ceil(0.2 * 1797)
    # Per-class counts of the UCI digits as sklearn documents them.
    published = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (np.bincount(data.y_train) + np.bincount(data.y_test)).tolist() == published
    assert dense(data.x_train).min() >= 0.0 and dense(data.x_train).max() <= 1.0


@pytest.mark.parametrize(
    ("name", "train_counts", "test_counts", "pixel_mean"),
    [
        (
            "mnist",
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
            0.1307,
        ),
        ("fashion-mnist", [6000] * 10, [1000] * 10, 0.2860),
    ],
)
def test_idx_datasets_match_published_counts_and_statistics(
    root: str, name: str, train_counts: list[int], test_counts: list[int], pixel_mean: float
) -> None:
    data = load_dataset(name, root)
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert np.bincount(data.y_train).tolist() == train_counts
    assert np.bincount(data.y_test).tolist() == test_counts
    # Normalized with the published training mean/std: mean 0, std 1 to 3 decimals.
    assert abs(float(dense(data.x_train).mean(dtype=np.float64))) < 2e-3
    assert abs(float(dense(data.x_train).std(dtype=np.float64)) - 1.0) < 2e-3
    # A black pixel maps to -mean/std.
    assert np.isclose(data.x_train.min(), -pixel_mean / {"mnist": 0.3081, "fashion-mnist": 0.3530}[name])


def test_femnist_sizes_writers_and_ink_convention(root: str) -> None:
    data = load_dataset("femnist", root)
    assert data.y_unseen is not None
    assert (len(data.y_train), len(data.y_test), len(data.y_unseen)) == (41434, 4756, 7060)
    assert data.x_unseen is not None and data.x_unseen.shape == (7060, 1, 28, 28)
    assert data.train_ids is not None and data.test_ids is not None
    assert len(np.unique(data.train_ids)) == 300
    assert set(np.unique(data.test_ids)) == set(np.unique(data.train_ids))
    assert data.y_train.max() == 61 and data.y_train.min() == 0
    raw = np.load(DATA_ROOT / "femnist_leaf" / "femnist_leaf_subset.npz")
    assert len(np.unique(raw["writer_unseen"])) == 240
    assert not set(np.unique(raw["writer_unseen"])) & set(np.unique(data.train_ids))
    # White background (255 in the file) becomes the lowest value, ink is high, like MNIST.
    background = (0.0 - 0.1307) / 0.3081
    assert np.isclose(dense(data.x_train)[:, 0, 0, 0], background).mean() > 0.95
    dark = raw["x_train"] < 128
    assert (dense(data.x_train)[:, 0][dark] > 1.0).all()


def test_har_windows_users_and_standardization(root: str) -> None:
    data = load_dataset("har", root, seed=42)
    assert data.x_train.shape[1:] == (6, 128) and data.x_train.dtype == np.float32
    total = len(data.y_train) + len(data.y_test)
    assert 9500 <= total <= 11000  # README: "about 10k single-activity windows"
    assert data.train_ids is not None and data.test_ids is not None
    assert set(np.unique(data.train_ids)) == set(np.unique(data.test_ids)) == set(range(1, 31))
    per_user = np.bincount(np.concatenate([data.train_ids, data.test_ids]))[1:]
    assert per_user.min() >= 250 and per_user.max() <= 430  # README: 269-404 per user
    assert set(np.unique(data.y_train)) == set(range(12))
    x = dense(data.x_train).astype(np.float64)
    assert np.allclose(x.mean(axis=(0, 2)), 0.0, atol=1e-4)
    assert np.allclose(x.std(axis=(0, 2)), 1.0, atol=1e-4)
    # Every user's windows are split 80/20.
    test_per_user = np.bincount(data.test_ids)[1:]
    assert np.array_equal(test_per_user, np.round(0.2 * per_user).astype(int))


def test_har_other_seed_splits_differently(root: str) -> None:
    a, b = load_dataset("har", root, seed=1), load_dataset("har", root, seed=2)
    assert len(a.y_test) == len(b.y_test)
    assert not np.array_equal(a.x_test[:50], b.x_test[:50])


def raw_shakespeare_users() -> dict[str, str]:
    with gzip.open(DATA_ROOT / "shakespeare_oss" / "oss_shakespeare_by_speaker.json.gz", "rt") as f:
        users: dict[str, str] = json.load(f)["users"]
    return users


def leaf_encode(text: str) -> list[int]:
    """LEAF's letter_to_index with \\n -> space and unknown characters -> space."""
    text = text.replace("\n", " ")
    return [LEAF_ALPHABET.find(c) if c in LEAF_ALPHABET else LEAF_ALPHABET.find(" ") for c in text]


def test_shakespeare_users_and_lazy_windows_match_the_raw_text(root: str) -> None:
    users = raw_shakespeare_users()
    assert len(users) == 1298
    # Independent recount: a text of L chars has n = L - 80 windows, ceil(n / 5) of them test.
    kept = []
    for key in sorted(users):
        n = len(users[key]) - 80
        n_test = math.ceil(n / 5) if n > 0 else 0
        if n_test >= 2 and n - n_test >= 2:
            kept.append((key, n - n_test, n_test))
    data = load_dataset("shakespeare", root)
    assert isinstance(data.x_train, TokenWindows) and isinstance(data.x_test, TokenWindows)
    assert data.train_ids is not None and data.test_ids is not None
    assert len(np.unique(data.train_ids)) == len(kept) == len(np.unique(data.test_ids))
    assert len(data.y_train) == sum(k[1] for k in kept)
    assert len(data.y_test) == sum(k[2] for k in kept)
    assert data.x_train.shape == (len(data.y_train), 80) and data.x_train.dtype == np.int64
    for user in (0, 7, len(kept) // 2, len(kept) - 1):
        key, n_train, _ = kept[user]
        codes = leaf_encode(users[key])
        rows = np.flatnonzero(data.train_ids == user)
        test_rows = np.flatnonzero(data.test_ids == user)
        for i in (0, 1, n_train - 1):
            assert data.x_train[rows[i]].tolist() == codes[i : i + 80]
            assert data.y_train[rows[i]] == codes[i + 80]
        # The last test window ends one character before the end of the text.
        assert data.x_test[test_rows[-1]].tolist() == codes[-81:-1]
        assert data.y_test[test_rows[-1]] == codes[-1]
        # The first test window starts right after the last train window.
        assert data.x_test[test_rows[0]].tolist() == codes[n_train : n_train + 80]


def test_token_windows_indexing_like_numpy() -> None:
    codes = np.arange(20, dtype=np.uint8)
    windows = TokenWindows(codes, np.array([0, 5, 10], dtype=np.int64), window_len=4)
    assert len(windows) == 3 and windows.shape == (3, 4) and windows.dtype == np.int64
    assert windows[1].tolist() == [5, 6, 7, 8] and windows[1].dtype == np.int64
    assert windows[-1].tolist() == [10, 11, 12, 13]
    assert windows[1:].tolist() == [[5, 6, 7, 8], [10, 11, 12, 13]]
    assert windows[np.array([2, 0])].tolist() == [[10, 11, 12, 13], [0, 1, 2, 3]]
    assert windows[np.array([True, False, True])].shape == (2, 4)
    assert windows[np.array([], dtype=np.int64)].shape == (0, 4)
    sub = windows.subset(np.array([2]))
    assert isinstance(sub, TokenWindows) and np.asarray(sub).tolist() == [[10, 11, 12, 13]]
    with pytest.raises(DataError):
        TokenWindows(codes, np.array([17]), window_len=4)


def test_heart_hospitals_rows_and_imputation(root: str) -> None:
    data = load_dataset("heart", root, seed=0)
    assert data.train_ids is not None and data.test_ids is not None
    rows = np.bincount(data.train_ids, minlength=4) + np.bincount(data.test_ids, minlength=4)
    assert rows.tolist() == [303, 294, 123, 200]  # UCI / FLamby rows per hospital
    assert np.bincount(data.test_ids).tolist() == [61, 59, 25, 40]  # round(0.2 * rows)
    assert data.x_train.shape == (735, 13) and data.x_train.dtype == np.float32
    assert np.isfinite(data.x_train).all() and np.isfinite(data.x_test).all()
    positives = 0
    for hospital in ("cleveland", "hungarian", "switzerland", "va"):
        text = (DATA_ROOT / "heart_disease_uci" / f"processed.{hospital}.data").read_text()
        positives += sum(float(line.split(",")[13]) > 0 for line in text.splitlines() if line)
    assert int(data.y_train.sum() + data.y_test.sum()) == positives
    assert np.allclose(dense(data.x_train).mean(axis=0), 0.0, atol=1e-5)


def test_cifar10_sizes_and_classes(root: str) -> None:
    data = load_dataset("cifar10", root)
    assert data.x_train.shape == (50000, 3, 32, 32) and data.x_test.shape == (10000, 3, 32, 32)
    assert data.x_train.dtype == np.float32
    assert np.bincount(data.y_train).tolist() == [5000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    # Normalized with CIFAR-10's published statistics; the README says JPEG q75 leaves the
    # std about 1% below the original's. (The files are sorted by class: use all rows.)
    means = dense(data.x_train).mean(axis=(0, 2, 3), dtype=np.float64)
    stds = dense(data.x_train).std(axis=(0, 2, 3), dtype=np.float64)
    assert np.allclose(means, 0.0, atol=0.01)
    assert np.allclose(stds, 0.99, atol=0.01)


def test_load_dataset_is_cached_per_process(root: str) -> None:
    assert load_dataset("femnist", root) is load_dataset("femnist", root + "/")
    assert load_dataset("digits", seed=5) is load_dataset("digits", seed=5)
    assert load_dataset("digits", seed=5) is not load_dataset("digits", seed=6)


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("foo")
    message = one_line_error(excinfo)
    assert "unknown dataset 'foo'" in message and "digits, mnist, fashion-mnist" in message


def test_missing_data_dir_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    assert "--data-dir" in one_line_error(excinfo) and DATA_DIR_ENV in str(excinfo.value)
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir("mnist", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in one_line_error(excinfo)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir("mnist", "")
    assert str(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz") in one_line_error(excinfo)


def test_data_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, root)
    assert resolve_data_dir("heart", None) == Path(root).resolve()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dirichlet", "needs its concentration"),
        ("dirichlet:x", "not a number"),
        ("dirichlet:-1", "alpha must be > 0"),
        ("dirichlet:0", "alpha must be > 0"),
        ("dirichlet:nan", "alpha must be > 0"),
        ("pathological:0", "K must be >= 1"),
        ("pathological:1.5", "not an integer"),
        ("iid:2", "takes no argument"),
        ("foo", "unknown kind"),
        ("", "unknown kind"),
    ],
)
def test_bad_partition_text_lists_the_valid_forms(text: str, reason: str) -> None:
    with pytest.raises(DataError) as excinfo:
        parse_partition(text)
    message = one_line_error(excinfo)
    assert reason in message and f"bad partition {text!r}" in message
    assert message.endswith("use iid, dirichlet:ALPHA, pathological:K or natural")


def test_partition_text_parses() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", alpha=0.5)
    assert parse_partition("pathological:2") == PartitionSpec("pathological", classes_per_client=2)
    assert parse_partition("natural") == PartitionSpec("natural")
    assert str(parse_partition("dirichlet:0.5")) == "dirichlet:0.5"


def test_natural_on_a_dataset_without_natural_ids(root: str) -> None:
    with pytest.raises(DataError) as excinfo:
        FederatedData("mnist", "natural", 10, seed=0, data_dir=root)
    assert one_line_error(excinfo) == (
        "dataset 'mnist' has no natural split; use iid, dirichlet:ALPHA or pathological:K"
    )
    with pytest.raises(DataError) as excinfo:
        partition_indices(np.zeros(10, dtype=np.int64), PartitionSpec("natural"), 2, seed=0)
    assert "use iid, dirichlet:ALPHA or pathological:K" in one_line_error(excinfo)


def test_partition_counts_out_of_range() -> None:
    labels = np.arange(10) % 3
    for num_partitions in (0, -1, 11):
        with pytest.raises(DataError) as excinfo:
            partition_indices(labels, PartitionSpec("iid"), num_partitions, seed=0)
        assert "between 1 and the number of training samples (10)" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        partition_indices(labels, PartitionSpec("natural"), 4, seed=0, natural_ids=labels)
    assert "at most 3 clients" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        partition_indices(labels, PartitionSpec("pathological", classes_per_client=4), 2, seed=0)
    assert "lower K" in one_line_error(excinfo)


def test_partition_id_out_of_range() -> None:
    fd = FederatedData("digits", "iid", 5, seed=0)
    for bad in (-1, 5):
        with pytest.raises(DataError) as excinfo:
            fd.client_train(bad)
        assert "use 0 to 4" in one_line_error(excinfo)
    with pytest.raises(DataError):
        fd.client_test(5)


def test_federated_data_validates_eagerly_without_loading() -> None:
    with pytest.raises(DataError):
        FederatedData("foo", "iid", 2, seed=0)
    with pytest.raises(DataError):
        FederatedData("digits", "dirichlet:-1", 2, seed=0)
    with pytest.raises(DataError):
        FederatedData("digits", "iid", 0, seed=0)
    with pytest.raises(DataError):
        FederatedData("digits", "iid", 2, seed=0, local_test_fraction=1.0)


# ----------------------------------------------------------------------------- partitions


def synthetic_labels(num_rows: int = 6000, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, num_classes, num_rows)


def assert_exact_cover(parts: list[np.ndarray], num_rows: int) -> None:
    every = np.concatenate(parts)
    assert every.dtype == np.int64
    assert np.array_equal(np.sort(every), np.arange(num_rows))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.3", "pathological:2", "natural"])
def test_every_index_exactly_once(text: str) -> None:
    labels = synthetic_labels()
    ids = np.random.default_rng(5).integers(0, 40, labels.size)
    parts = partition_indices(labels, parse_partition(text), 40, seed=7, natural_ids=ids)
    assert len(parts) == 40
    assert_exact_cover(parts, labels.size)


def test_iid_sizes_are_balanced() -> None:
    labels = synthetic_labels(6007)
    parts = partition_indices(labels, PartitionSpec("iid"), 10, seed=0)
    assert sorted({len(p) for p in parts}) == [600, 601]
    assert sum(len(p) == 601 for p in parts) == 6007 % 10


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.5"])
def test_same_seed_same_partitions_other_seed_different(text: str) -> None:
    labels = synthetic_labels()
    spec = parse_partition(text)
    first = partition_indices(labels, spec, 20, seed=11)
    again = partition_indices(labels, spec, 20, seed=11)
    other = partition_indices(labels, spec, 20, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_pathological_clients_hold_at_most_k_labels() -> None:
    labels = synthetic_labels()
    parts = partition_indices(labels, PartitionSpec("pathological", classes_per_client=2), 30, seed=3)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) > 0 for p in parts)
    # first-deterministic: client k holds label k % 10.
    assert all(k % 10 in set(labels[p].tolist()) for k, p in enumerate(parts))


def max_label_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]))


def test_dirichlet_small_alpha_skews_labels_more(root: str) -> None:
    labels = load_dataset("mnist", root).y_train
    skewed = partition_indices(labels, PartitionSpec("dirichlet", alpha=0.1), 20, seed=0)
    even = partition_indices(labels, PartitionSpec("dirichlet", alpha=100.0), 20, seed=0)
    assert_exact_cover(skewed, labels.size)
    assert max_label_share(labels, skewed) > 0.4
    # alpha=100: close to the ~11% largest-class share of MNIST itself.
    assert max_label_share(labels, even) < 0.15


def test_dirichlet_never_leaves_a_client_empty() -> None:
    labels = synthetic_labels(300)
    for seed in range(10):
        parts = partition_indices(labels, PartitionSpec("dirichlet", alpha=0.05), 60, seed=seed)
        assert min(len(p) for p in parts) >= 1
        assert_exact_cover(parts, labels.size)


def test_dirichlet_60k_into_100_is_fast() -> None:
    labels = synthetic_labels(60000)
    partition_indices(labels[:100], PartitionSpec("dirichlet", alpha=0.5), 2, seed=0)  # imports
    start_s = time.perf_counter()
    parts = partition_indices(labels, PartitionSpec("dirichlet", alpha=0.5), 100, seed=0)
    elapsed_s = time.perf_counter() - start_s
    assert_exact_cover(parts, labels.size)
    assert elapsed_s < 2.0


@pytest.mark.parametrize("text", ["dirichlet:0.3", "pathological:2", "natural"])
def test_fast_assignment_equals_load_partition(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Reference: one public ``load_partition`` per client, the slow, obvious way."""
    labels = synthetic_labels(3000)
    ids = np.random.default_rng(9).integers(100, 150, labels.size)
    spec = parse_partition(text)
    fast = partition_indices(labels, spec, 25, seed=4, natural_ids=ids)
    monkeypatch.setattr(
        partition_module,
        "_assigned_indices",
        lambda partitioner, n, idx: partition_module._indices_of(partitioner, n),
    )
    slow = partition_indices(labels, spec, 25, seed=4, natural_ids=ids)
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_natural_femnist_partition_k_is_the_kth_sorted_writer(root: str) -> None:
    raw = np.load(DATA_ROOT / "femnist_leaf" / "femnist_leaf_subset.npz")
    writers = np.unique(raw["writer_train"])
    data = load_dataset("femnist", root)
    parts = partition_indices(data.y_train, PartitionSpec("natural"), 300, seed=0, natural_ids=data.train_ids)
    assert_exact_cover(parts, 41434)
    for k in (0, 1, 150, 299):
        assert np.array_equal(parts[k], np.flatnonzero(raw["writer_train"] == writers[k]))
    first_ten = partition_indices(
        data.y_train, PartitionSpec("natural"), 10, seed=0, natural_ids=data.train_ids
    )
    assert all(np.array_equal(a, b) for a, b in zip(first_ten, parts[:10], strict=True))


# ----------------------------------------------------------------------------- FederatedData


@pytest.mark.parametrize(
    ("dataset", "partition", "num_partitions"),
    [
        ("digits", "dirichlet:0.5", 10),
        ("mnist", "iid", 10),
        ("fashion-mnist", "pathological:2", 10),
        ("femnist", "natural", 20),
        ("har", "natural", 30),
        ("shakespeare", "natural", 8),
        ("heart", "natural", 4),
        ("cifar10", "dirichlet:1", 10),
    ],
)
def test_federated_data_shapes_and_dtypes(
    root: str, dataset: str, partition: str, num_partitions: int
) -> None:
    fd = FederatedData(dataset, partition, num_partitions, seed=0, data_dir=root)
    spec = fd.spec
    for pid in (0, num_partitions - 1):
        for x, y in (fd.client_train(pid), fd.client_test(pid)):
            assert x.shape[1:] == spec.input_shape and x.dtype == np.dtype(spec.input_dtype)
            assert y.dtype == np.int64 and len(y) == len(x) > 0
            assert np.asarray(x[:2]).shape == (2, *spec.input_shape)
            assert y.min() >= 0 and y.max() < spec.num_classes
    x_test, y_test = fd.central_test()
    data = load_dataset(dataset, root, seed=0)
    # The whole test split, but shakespeare's every-91st window (test_central_test_of_shakespeare...).
    expected = 9_986 if dataset == "shakespeare" else len(data.y_test)
    assert len(x_test) == len(y_test) == expected
    sizes = fd.partition_sizes()
    assert len(sizes) == num_partitions and min(sizes) >= 1
    if partition != "natural":
        assert sum(sizes) == len(data.y_train)


def test_natural_client_test_is_that_writers_test_data(root: str) -> None:
    raw = np.load(DATA_ROOT / "femnist_leaf" / "femnist_leaf_subset.npz")
    writers = np.unique(raw["writer_train"])
    fd = FederatedData("femnist", "natural", 300, seed=0, data_dir=root)
    for k in (0, 299):
        _, y = fd.client_test(k)
        assert np.array_equal(y, raw["y_test"][raw["writer_test"] == writers[k]])
        _, y = fd.client_train(k)
        assert np.array_equal(y, raw["y_train"][raw["writer_train"] == writers[k]])


def test_heart_natural_clients_are_the_hospitals(root: str) -> None:
    fd = FederatedData("heart", "natural", 4, seed=0, data_dir=root)
    train = [len(fd.client_train(k)[1]) for k in range(4)]
    test = [len(fd.client_test(k)[1]) for k in range(4)]
    assert [a + b for a, b in zip(train, test, strict=True)] == [303, 294, 123, 200]


def test_local_test_fraction_splits_a_partition_disjointly(root: str) -> None:
    whole = FederatedData("mnist", "dirichlet:0.5", 10, seed=1, data_dir=root)
    split = FederatedData("mnist", "dirichlet:0.5", 10, seed=1, data_dir=root, local_test_fraction=0.2)
    for pid in (0, 9):
        x_all, y_all = whole.client_train(pid)
        x_tr, y_tr = split.client_train(pid)
        x_te, y_te = split.client_test(pid)
        assert len(y_te) == round(0.2 * len(y_all)) and len(y_tr) + len(y_te) == len(y_all)

        def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
            return sorted(xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y, strict=True))

        merged = np.concatenate([dense(x_tr), dense(x_te)])
        assert rows(merged, np.concatenate([y_tr, y_te])) == rows(dense(x_all), y_all)
    # Without a local split, a client evaluates on its training data (documented).
    assert np.array_equal(whole.client_test(3)[1], whole.client_train(3)[1])
    assert split.partition_sizes() == [
        len(whole.client_train(k)[1]) - round(0.2 * len(whole.client_train(k)[1])) for k in range(10)
    ]


def test_local_split_edge_cases() -> None:
    rng = np.random.default_rng(0)
    train, test = local_split(np.array([7]), 0.2, rng)
    assert train.tolist() == [7] and test.size == 0
    train, test = local_split(np.array([3, 9]), 0.2, rng)
    assert len(train) == len(test) == 1 and sorted([*train, *test]) == [3, 9]
    train, test = local_split(np.arange(10), 0.99, rng)
    assert len(train) == 1 and len(test) == 9


def test_federated_data_factory_is_cached_and_lazy(root: str) -> None:
    a = federated_data("digits", "iid", 4, 0)
    assert a is federated_data("digits", "iid", 4, 0)
    assert a is not federated_data("digits", "iid", 4, 1)
    assert a.spec.name == "digits" and a._data is None  # nothing loaded yet
    a.partition_sizes()
    assert a._data is not None


def test_federated_data_pickles_without_its_data() -> None:
    fd = FederatedData("digits", "pathological:2", 6, seed=2, local_test_fraction=0.25)
    sizes = fd.partition_sizes()
    copy = pickle.loads(pickle.dumps(fd))
    assert copy._data is None and copy.partition_sizes() == sizes
    assert np.array_equal(copy.client_test(5)[1], fd.client_test(5)[1])


# ----------------------------------------------------------------------------- central test


def test_central_test_is_the_whole_split_without_a_size_cap() -> None:
    assert SPECS["digits"].central_test_size == 0
    _, y = federated_data("digits", "iid", 5, 0).central_test()
    assert len(y) == 360  # 20% of scikit-learn's 1,797 digits, stratified (360 = 1797 - 1437)


def test_central_test_of_shakespeare_is_an_even_stride(root: str) -> None:
    # 908,712 test windows capped at 10,000: stride ceil(908712 / 10000) = 91 gives
    # ceil(908712 / 91) = 9,986 windows, the rows 0, 91, 182, ...
    assert SPECS["shakespeare"].central_test_size == 10_000
    full = load_dataset("shakespeare", root)
    x, y = federated_data("shakespeare", "natural", 10, 42, data_dir=root).central_test()
    assert len(full.y_test) == 908_712
    assert len(y) == 9_986
    np.testing.assert_array_equal(y, full.y_test[::91])
    np.testing.assert_array_equal(np.asarray(x[:3]), full.x_test[[0, 91, 182]])
