"""Tests of fedge.deploy.export: fp32 export, int8 quantization, accuracy, latency, errors.

Expected values come from elsewhere: PyTorch's own logits for the fp32 export,
parameter counts of the torch model for the int8 weights (one byte per weight),
ONNX's operator set for "is it quantized", hashlib's published SHA-256 of b"abc".
The trained model is cnn28 after one seeded epoch on 6,000 real MNIST images
(cnn8 on the bundled digits when the shared datasets are absent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fedge.data import load_dataset
from fedge.deploy.export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    ExportError,
    QuantizationInfo,
    export_onnx,
    file_sha256,
    latency_ms,
    onnx_accuracy,
    ort_session,
    quantize_int8,
)
from fedge.models import build_model
from fedge.training import train_local

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
NUM_TRAIN = 6000
NUM_TEST = 2000
NUM_CALIBRATION = 256
# The benchmark target for the trained 28x28 CNN.
MAX_INT8_TO_FP32_BYTES = 0.30
# Accuracy points (fraction 0.01) the int8 model may lose against fp32.
MAX_ACCURACY_DROP = 0.01

STATIC_OPS = {"QuantizeLinear", "DequantizeLinear"}
DYNAMIC_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class Trained:
    """A briefly trained zoo model with its data and fp32/int8 exports."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    fp32: Path
    int8: Path
    info: QuantizationInfo


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """cnn28 trained 1 epoch on 6,000 MNIST images (or cnn8 on digits), exported and quantized."""
    if (DATA_ROOT / "mnist").is_dir():
        name, data = "cnn28", load_dataset("mnist", str(DATA_ROOT))
    else:
        name, data = "cnn8", load_dataset("digits")
    x_train = np.asarray(data.x_train[:NUM_TRAIN])
    y_train = np.asarray(data.y_train[:NUM_TRAIN])
    input_shape = tuple(x_train.shape[1:])
    model = build_model(name, input_shape=input_shape, num_classes=10, seed=0)
    train_local(
        model,
        x_train,
        y_train,
        epochs=1 if name == "cnn28" else 10,
        batch_size=32,
        lr=0.05,
        momentum=0.9,
        generator=torch.Generator().manual_seed(0),
    )
    folder = tmp_path_factory.mktemp("export")
    fp32 = export_onnx(model, input_shape, "float32", folder / "model.fp32.onnx")
    info = quantize_int8(
        fp32,
        folder / "model.onnx",
        x_train[:NUM_CALIBRATION],
        calibration_source=f"server-split:{NUM_CALIBRATION}",
    )
    return Trained(
        name=name,
        model=model,
        input_shape=input_shape,
        x_train=x_train,
        x_test=np.asarray(data.x_test[:NUM_TEST]),
        y_test=np.asarray(data.y_test[:NUM_TEST]),
        fp32=fp32,
        int8=folder / "model.onnx",
        info=info,
    )


# --- fp32 export -------------------------------------------------------------------------------


def test_fp32_logits_equal_torch(trained: Trained) -> None:
    x = trained.x_test[:512]
    with torch.no_grad():
        expected = trained.model.eval()(torch.as_tensor(x)).numpy()
    (got,) = ort_session(trained.fp32).run([OUTPUT_NAME], {INPUT_NAME: x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_fp32_graph_interface(trained: Trained) -> None:
    model = onnx.load(str(trained.fp32))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    batch_dim = inp.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch axis
    dims = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])
    assert dims == trained.input_shape
    # A batch of 3 runs although the export traced a batch of 1.
    (logits,) = ort_session(trained.fp32).run(None, {INPUT_NAME: trained.x_test[:3]})
    assert logits.shape == (3, 10)


def test_export_is_deterministic_and_leaves_model_alone(trained: Trained, tmp_path: Path) -> None:
    model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=10, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training
    a = export_onnx(model, (1, 8, 8), "float32", tmp_path / "a.onnx")
    b = export_onnx(model, (1, 8, 8), "float32", tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert model.training  # the caller's mode is kept; the export traced a copy
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    other = build_model("cnn8", input_shape=(1, 8, 8), num_classes=10, seed=4)
    c = export_onnx(other, (1, 8, 8), "float32", tmp_path / "c.onnx")
    assert file_sha256(c) != file_sha256(a)


def test_export_int64_token_model(tmp_path: Path) -> None:
    model = build_model("chargru", input_shape=(80,), num_classes=40, seed=0)
    path = export_onnx(model, (80,), "int64", tmp_path / "gru.onnx")
    tokens = np.random.default_rng(0).integers(0, 40, size=(4, 80), dtype=np.int64)
    with torch.no_grad():
        expected = model.eval()(torch.as_tensor(tokens)).numpy()
    (got,) = ort_session(path).run(None, {INPUT_NAME: tokens})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


class _Spectrum(nn.Module):
    """|FFT| features: aten::fft_fft has no ONNX symbolic in the TorchScript exporter at opset 17."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.fft(x).abs())


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"operator 'aten::fft_fft' is not supported in opset 17") as err:
        export_onnx(_Spectrum(), (16,), "float32", tmp_path / "fft.onnx")
    assert "\n" not in str(err.value)


def test_export_rejects_bad_arguments(tmp_path: Path) -> None:
    model = build_model("mlp", input_shape=(4,), num_classes=2, seed=0)
    with pytest.raises(ValueError, match="input_dtype"):
        export_onnx(model, (4,), "float16", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(model, (5,), "float32", tmp_path / "m.onnx")  # wrong width for fc1


# --- int8 quantization ---------------------------------------------------------------------------


def test_static_info_is_recorded(trained: Trained) -> None:
    assert trained.info == QuantizationInfo(
        mode="static",
        per_channel=True,
        weight_type="int8",
        activation_type="int8",
        calibration_source=f"server-split:{NUM_CALIBRATION}",
        calibration_samples=NUM_CALIBRATION,
        opset=OPSET,
        reduce_range=True,
        float_ops=(),
        float_nodes=(),
    )


def test_fused_int8_kernels_equal_the_unfused_qdq_graph(trained: Trained) -> None:
    # The device's session (QDQ fused into integer kernels) against the same QDQ graph
    # evaluated op by op in float (ORT_DISABLE_ALL): with 7-bit weights no kernel of any
    # x86-64 CPU saturates (2 * 255 * 64 = 32640 < 32767), so only float rounding of the
    # requantization differs. Margins hold on Intel VNNI and AMD AVX2 alike.
    x = trained.x_test
    fused = ort_session(trained.int8).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    unfused = ort_session(trained.int8, optimize=False).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    same = float((fused.argmax(1) == unfused.argmax(1)).mean())
    assert same >= 0.995, f"{(1 - same) * len(x):.0f} of {len(x)} predictions differ"
    scale = float(np.abs(unfused).max())
    assert scale > 1.0  # a trained model: logits far from 0, so the bound below means something
    assert float(np.abs(fused - unfused).max()) <= 0.05 * scale


def test_weights_are_seven_bit(trained: Trained) -> None:
    # reduce_range: every quantized weight lies in [-64, 64], so a pair of u8 x s8
    # products (2 * 255 * 64 = 32640) fits the int16 accumulator of AVX2's vpmaddubsw.
    arrays = _initializers(trained.int8)
    weights = [v for k, v in arrays.items() if k.endswith("weight_quantized")]
    assert weights
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


def test_tabular_model_keeps_first_and_last_layer_float(tmp_path: Path) -> None:
    model = build_model("mlp", input_shape=(13,), num_classes=2, seed=0)
    fp32 = export_onnx(model, (13,), "float32", tmp_path / "mlp.onnx")
    calibration = np.random.default_rng(0).normal(size=(64, 13)).astype(np.float32)
    info = quantize_int8(fp32, tmp_path / "mlp8.onnx", calibration)
    assert info.float_nodes == ("/fc1/Gemm", "/fc3/Gemm")
    arrays = _initializers(tmp_path / "mlp8.onnx")
    # fc2 alone is int8; fc1 and fc3 keep their float32 weights (13 x 64 and 64 x 2).
    assert arrays["fc2.weight_quantized"].dtype == np.int8
    assert arrays["fc1.weight"].dtype == np.float32 and arrays["fc3.weight"].dtype == np.float32
    x = np.random.default_rng(1).normal(size=(256, 13)).astype(np.float32)
    fp32_pred = ort_session(fp32).run(None, {INPUT_NAME: x})[0].argmax(1)
    int8_pred = ort_session(tmp_path / "mlp8.onnx").run(None, {INPUT_NAME: x})[0].argmax(1)
    assert float((fp32_pred == int8_pred).mean()) >= 0.95


def test_static_graph_is_quantized(trained: Trained) -> None:
    model = onnx.load(str(trained.int8))
    assert _op_types(trained.int8) >= STATIC_OPS
    inits = {t.name: t for t in model.graph.initializer}
    # Activations really are int8 (QuantizationInfo.activation_type): the zero point of
    # every QuantizeLinear fixes its output type.
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    assert {inits[n.input[2]].data_type for n in q_nodes} == {onnx.TensorProto.INT8}
    # Every weight is stored as one int8 per element with one scale per output channel.
    weights = {k: v for k, v in trained.model.state_dict().items() if k.endswith("weight")}
    arrays = _initializers(trained.int8)
    for key, value in weights.items():
        quantized = arrays[f"{key}_quantized"]
        assert quantized.dtype == np.int8 and quantized.shape == tuple(value.shape)
        assert arrays[f"{key}_scale"].shape == (value.shape[0],)
    assert not any(name in arrays for name in weights)  # no float copy left behind


def test_int8_size_ratio(trained: Trained) -> None:
    fp32_bytes = trained.fp32.stat().st_size
    int8_bytes = trained.int8.stat().st_size
    num_params = sum(p.numel() for p in trained.model.parameters())
    # fp32 is 4 bytes a parameter plus the graph; int8 at least 1 byte a parameter.
    assert fp32_bytes >= 4 * num_params
    assert int8_bytes >= num_params
    if trained.name == "cnn28":
        # cnn28: 52,138 params; per-channel scales, int32 biases and QDQ nodes add
        # about 8 kB to the 52 kB of int8 weights, i.e. about 0.29 of fp32.
        assert int8_bytes <= MAX_INT8_TO_FP32_BYTES * fp32_bytes
    else:
        # cnn8 (5,130 params) is small enough for the fixed graph overhead to show.
        assert int8_bytes <= 0.5 * fp32_bytes


def test_int8_accuracy_within_one_point(trained: Trained) -> None:
    fp32_acc = onnx_accuracy(trained.fp32, trained.x_test, trained.y_test)
    int8_acc = onnx_accuracy(trained.int8, trained.x_test, trained.y_test)
    with torch.no_grad():
        torch_pred = trained.model.eval()(torch.as_tensor(trained.x_test)).argmax(1).numpy()
    torch_acc = float((torch_pred == trained.y_test).mean())
    assert abs(fp32_acc - torch_acc) <= 1 / NUM_TEST  # at most one near-tie flips
    assert fp32_acc > 0.85  # the model learned something, so the comparison means something
    assert int8_acc >= fp32_acc - MAX_ACCURACY_DROP


def test_onnx_accuracy_does_not_depend_on_batch_size(trained: Trained) -> None:
    x, y = trained.x_test[:300], trained.y_test[:300]
    assert onnx_accuracy(trained.fp32, x, y, batch_size=7) == onnx_accuracy(trained.fp32, x, y)
    with pytest.raises(ValueError, match="equal length"):
        onnx_accuracy(trained.fp32, x, y[:10])


def test_quantization_is_deterministic(trained: Trained, tmp_path: Path) -> None:
    calibration = trained.x_train[:NUM_CALIBRATION]
    quantize_int8(trained.fp32, tmp_path / "again.onnx", calibration, calibration_source="x")
    assert file_sha256(tmp_path / "again.onnx") == file_sha256(trained.int8)


def test_dynamic_without_calibration(trained: Trained, tmp_path: Path) -> None:
    info = quantize_int8(trained.fp32, tmp_path / "dyn.onnx", None, calibration_source="ignored")
    assert info == QuantizationInfo(
        mode="dynamic",
        per_channel=False,
        weight_type="int8",
        activation_type="uint8",
        calibration_source="none",
        calibration_samples=0,
        opset=OPSET,
        reduce_range=True,
    )
    ops = _op_types(tmp_path / "dyn.onnx")
    assert ops & DYNAMIC_OPS and "DynamicQuantizeLinear" in ops  # uint8 activations by ONNX's spec
    assert not ops & {"QuantizeLinear"}
    fp32_acc = onnx_accuracy(trained.fp32, trained.x_test, trained.y_test)
    dynamic_acc = onnx_accuracy(tmp_path / "dyn.onnx", trained.x_test, trained.y_test)
    assert dynamic_acc >= fp32_acc - MAX_ACCURACY_DROP


def test_unnamed_calibration_is_not_recorded_as_none(trained: Trained, tmp_path: Path) -> None:
    info = quantize_int8(trained.fp32, tmp_path / "q.onnx", trained.x_train[:32])
    assert (info.mode, info.calibration_source, info.calibration_samples) == ("static", "array:32", 32)


def test_gru_graph_is_quantized_dynamically(tmp_path: Path) -> None:
    model = build_model("chargru", input_shape=(20,), num_classes=30, seed=0)
    fp32 = export_onnx(model, (20,), "int64", tmp_path / "gru.onnx")
    tokens = np.random.default_rng(1).integers(0, 30, size=(64, 20), dtype=np.int64)
    info = quantize_int8(fp32, tmp_path / "gru8.onnx", tokens, calibration_source="server-split:64")
    # ORT has no QDQ GRU: the static pass is skipped, the GRU weights stay float32.
    assert (info.mode, info.calibration_source, info.calibration_samples) == ("dynamic", "none", 0)
    assert info.float_ops == ("GRU",)
    ops = _op_types(tmp_path / "gru8.onnx")
    assert "GRU" in ops and "MatMulInteger" in ops and "QuantizeLinear" not in ops
    (fp32_logits,) = ort_session(fp32).run(None, {INPUT_NAME: tokens})
    (int8_logits,) = ort_session(tmp_path / "gru8.onnx").run(None, {INPUT_NAME: tokens})
    assert np.abs(int8_logits - fp32_logits).max() < 0.05


class _TokenClassifier(nn.Module):
    """Embedding + linear, no recurrence: quantized statically (Gather, Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.embedding(x), 1))


def test_failing_calibration_names_the_operator(tmp_path: Path) -> None:
    fp32 = export_onnx(_TokenClassifier(), (6,), "int64", tmp_path / "tok.onnx")
    tokens_from_wrong_vocab = np.full((8, 6), 50, dtype=np.int64)  # ids must be < 10
    with pytest.raises(ExportError, match=r"quantization \(static\) failed in operator 'Gather'") as err:
        quantize_int8(fp32, tmp_path / "tok8.onnx", tokens_from_wrong_vocab)
    assert "\n" not in str(err.value)


class _NothingToQuantize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + 1.0


def test_model_without_quantizable_operator_fails(tmp_path: Path) -> None:
    fp32 = export_onnx(_NothingToQuantize(), (4,), "float32", tmp_path / "plain.onnx")
    with pytest.raises(ExportError, match=r"left the model in float: .*\(Add, .*Relu\)"):
        quantize_int8(fp32, tmp_path / "plain8.onnx", None)


def test_quantize_rejects_bad_inputs(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not an onnx model")
    with pytest.raises(ExportError, match="cannot read the fp32 ONNX model"):
        quantize_int8(bogus, tmp_path / "out.onnx", None)
    fp32 = export_onnx(_TokenClassifier(), (6,), "int64", tmp_path / "tok.onnx")
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_int8(fp32, tmp_path / "out.onnx", np.zeros((0, 6), dtype=np.int64))


# --- latency and hashing -------------------------------------------------------------------------


def test_latency_percentiles(tmp_path: Path) -> None:
    model = build_model("mlp", input_shape=(16,), num_classes=4, seed=0)
    path = export_onnx(model, (16,), "float32", tmp_path / "mlp.onnx")
    sample = np.random.default_rng(0).standard_normal((1, 16), dtype=np.float32)
    lat = latency_ms(path, sample)  # default: 200 timed runs after 20 warm-up runs
    assert set(lat) == {"p50", "p95", "p99"}
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert lat["p50"] < 1000  # a 16-64-64-4 MLP takes microseconds, not seconds
    with pytest.raises(ValueError, match="batch size 1"):
        latency_ms(path, np.zeros((2, 16), dtype=np.float32))


def test_file_sha256_known_value(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    # FIPS 180-2, appendix B.1.
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    payload = bytes(range(256)) * 9000  # more than one 1 MiB read
    big.write_bytes(payload)
    assert file_sha256(big) == hashlib.sha256(payload).hexdigest()
