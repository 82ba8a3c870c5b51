"""Tests of the model zoo: sizes, shapes, seeded init, errors, ONNX parity, a real accuracy."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedge.models import (
    MODELS,
    CharGru,
    Cnn28,
    Har1d,
    Mlp,
    ModelError,
    build_model,
    count_parameters,
)

VOCAB_SIZE = 80

# name -> (input_shape, num_classes) of the data each model is made for.
SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "cnn8": ((1, 8, 8), 10),
    "cnn28": ((1, 28, 28), 62),
    "mlp": ((13,), 2),
    "har1d": ((6, 128), 6),
    "chargru": ((80,), VOCAB_SIZE),
    "cnn32": ((3, 32, 32), 10),
}


def _build(name: str, seed: int = 0) -> nn.Module:
    input_shape, num_classes = SPECS[name]
    return build_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed)


def _batch(name: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    input_shape, _ = SPECS[name]
    if name == "chargru":
        return torch.randint(0, VOCAB_SIZE, (batch_size, *input_shape), generator=generator)
    return torch.randn(batch_size, *input_shape, generator=generator)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_holds_exactly_the_six_models() -> None:
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_model_is_small_and_outputs_logits(name: str) -> None:
    model = _build(name)
    _, num_classes = SPECS[name]
    assert 0 < count_parameters(model) < 1_000_000
    logits = model(_batch(name, 5, torch.Generator().manual_seed(1)))
    assert logits.shape == (5, num_classes)
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("name", list(SPECS))
def test_model_has_no_dropout_or_batch_norm(name: str) -> None:
    banned = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    assert not any(isinstance(m, banned) for m in _build(name).modules())
    assert not list(_build(name).buffers())


def test_parameter_counts_match_closed_forms() -> None:
    # Conv: out * (in * k * k + 1); Linear: out * (in + 1).
    cnn28 = 8 * (1 * 9 + 1) + 16 * (8 * 9 + 1) + 64 * (16 * 7 * 7 + 1) + 10 * (64 + 1)
    assert count_parameters(Cnn28(10)) == cnn28 == 52_138
    mlp = 64 * (13 + 1) + 64 * (64 + 1) + 2 * (64 + 1)
    assert count_parameters(Mlp(13, 2)) == mlp == 5_186
    # GRU: 3 gates, each W_ih (H x E), W_hh (H x H) and two biases of H.
    gru = 3 * (128 * 8 + 128 * 128 + 2 * 128)
    chargru = 80 * 8 + gru + 80 * (128 + 1)
    assert count_parameters(CharGru(80, 80)) == chargru == 63_952


def test_har1d_follows_the_window_length() -> None:
    # Three stride-2 convolutions: 100 -> 50 -> 25 -> 13 timesteps of 64 channels.
    model = build_model("har1d", input_shape=(9, 100), num_classes=4, seed=0)
    assert isinstance(model, Har1d)
    assert model.fc1.in_features == 64 * math.ceil(100 / 8) == 64 * 13
    assert model(torch.zeros(3, 9, 100)).shape == (3, 4)


def test_chargru_vocab_size_defaults_to_num_classes() -> None:
    default = build_model("chargru", input_shape=(80,), num_classes=80, seed=0)
    assert isinstance(default, CharGru)
    assert default.embedding.num_embeddings == 80
    wider = build_model("chargru", input_shape=(80,), num_classes=80, seed=0, vocab_size=100)
    assert isinstance(wider, CharGru)
    assert wider.embedding.num_embeddings == 100


@pytest.mark.parametrize("name", list(SPECS))
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    assert _states_equal(_build(name, seed=7), _build(name, seed=7))
    first, other = _build(name, seed=7).state_dict(), _build(name, seed=8).state_dict()
    assert all(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", list(SPECS))
def test_build_model_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    _build(name, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", list(SPECS))
def test_weights_equal_pytorch_default_init_under_manual_seed(name: str) -> None:
    # Reference: the plain PyTorch way (global seed, then construct), isolated by fork_rng.
    input_shape, num_classes = SPECS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        reference = MODELS[name].from_spec(
            input_shape=input_shape, num_classes=num_classes, vocab_size=num_classes
        )
    assert _states_equal(_build(name, seed=5), reference)


def test_unknown_name_error_is_one_line_listing_choices() -> None:
    with pytest.raises(ModelError) as info:
        build_model("foo", input_shape=(1, 28, 28), num_classes=10, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message == "unknown model 'foo'; choose one of: cnn8, cnn28, mlp, har1d, chargru, cnn32"


def test_shape_mismatch_names_both_shapes_and_the_right_model() -> None:
    with pytest.raises(ModelError) as info:
        build_model("cnn28", input_shape=(1, 8, 8), num_classes=10, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert "(1, 28, 28)" in message
    assert "(1, 8, 8)" in message
    assert "'cnn8'" in message


def test_shape_no_model_takes_lists_all_models() -> None:
    with pytest.raises(ModelError, match="no model takes this shape; choose one of: cnn8"):
        build_model("cnn32", input_shape=(3, 32, 32, 1), num_classes=10, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 0}, "num_classes must be at least 1"),
        ({"vocab_size": -1}, "vocab_size must be 0"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_out_of_range_arguments_raise(kwargs: dict[str, int], pattern: str) -> None:
    arguments: dict[str, int] = {"num_classes": 10, "seed": 0, **kwargs}
    with pytest.raises(ModelError, match=pattern):
        build_model("mlp", input_shape=(13,), **arguments)


def test_input_shape_accepts_numpy_ints_and_rejects_floats() -> None:
    shape = tuple(np.array([1, 28, 28], dtype=np.int64))
    model = build_model("cnn28", input_shape=shape, num_classes=10, seed=0)
    assert _states_equal(model, build_model("cnn28", input_shape=(1, 28, 28), num_classes=10, seed=0))
    with pytest.raises(ModelError, match="input_shape must be a tuple of ints"):
        build_model("cnn28", input_shape=(1.0, 28.0, 28.0), num_classes=10, seed=0)  # type: ignore[arg-type]


def test_model_error_is_a_value_error() -> None:
    assert issubclass(ModelError, ValueError)


@pytest.mark.parametrize("name", list(SPECS))
def test_onnx_export_matches_torch(name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _build(name).eval()
    generator = torch.Generator().manual_seed(2)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is legacy; the dynamo
        # exporter needs onnxscript, which fedge does not depend on.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (_batch(name, 2, generator),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batch(name, 7, generator)  # another batch size than at export: the axis is dynamic
    (onnx_logits,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch_logits = model(x).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=1e-4)


def test_cnn8_reaches_95_percent_on_sklearn_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    features, labels = datasets.load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    num_train = int(0.8 * len(x))
    train, test = order[:num_train], order[num_train:]

    model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=10, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(10):
        epoch = train[torch.randperm(num_train, generator=shuffle)]
        for start in range(0, num_train, 32):
            batch = epoch[start : start + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(dim=1) == y[test]).float().mean().item()
    assert accuracy >= 0.95
