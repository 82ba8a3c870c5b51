"""Per-round export steps: PyTorch model -> fp32 ONNX -> int8 ONNX, then accuracy and latency.

Each step is a pure function of its arguments and the paths it is given (no Flower,
no global state), so the server's export hook can chain them and a test can run any
one alone::

    fp32 = export_onnx(model, (1, 28, 28), "float32", folder / "model.fp32.onnx")
    info = quantize_int8(fp32, folder / "model.onnx", x_calib, calibration_source="server-split:256")
    acc = onnx_accuracy(folder / "model.onnx", x_test, y_test)
    lat = latency_ms(folder / "model.onnx", x_test[:1])

Quantization is ONNX Runtime's (``onnxruntime.quantization``):

* **static** (calibration data given): QDQ format, int8 weights with one scale per
  output channel, int8 activations with per-tensor scales from min/max calibration.
  ORT's CPU provider fuses each ``DequantizeLinear -> op -> QuantizeLinear`` group
  into an integer kernel (``QLinearConv``, ``QGemm``, ...) when it loads the model.
* **dynamic** (no calibration data): int8 weights, activations quantized to uint8 at
  run time per tensor (``DynamicQuantizeLinear`` -> ``ConvInteger`` / ``MatMulInteger``).

Both modes use ``reduce_range`` (7-bit weights), so that a model scores the same on
every x86-64 CPU: without VNNI, ORT's u8 x s8 kernels add pairs of products in int16
(``vpmaddubsw``), and ``2 * 255 * 127 = 64770`` saturates where ``2 * 255 * 64 = 32640``
does not. Measured on an AMD EPYC (AVX2, no VNNI): full-range weights lost 1.39 points
on a digits model that lost 0.56 with ``reduce_range``, whose fused kernels then equal
the unfused QDQ graph bit for bit.

A tabular model (one float input of shape ``(N, features)``) keeps its first and last
layers in float32 (:attr:`QuantizationInfo.float_nodes`): the first sees heterogeneous
features (flags, counts, standardized values with outliers) through one per-tensor
input scale, the last turns int8 rounding of near-tie logits into flipped predictions,
and both are small (13 x 64 and 64 x 2 weights for heart). Measured on heart disease by
hospital, 10 trained models (seeds 0-5), 185 test rows each on an AVX-512 VNNI CPU: 6
predictions in all differ from fp32 (largest drop 0.54 points) against 16 with every
layer quantized at full range (largest drop 1.08 points, which the 1-point gate refuses).

Graphs with a recurrent operator (``GRU``, ``LSTM``, ``RNN``; the zoo's ``chargru``)
are always quantized dynamically, even when calibration data is given: ORT has no
QDQ kernel for any of them, so a static pass would leave the recurrent weights in
float and only add a quantize/dequantize round trip on the recurrent input and an
int8 rounding of the logits, for no saving. The dynamic pass quantizes the embedding
(``Gather``) and the classifier (``MatMulInteger``), and ``LSTM`` too
(``DynamicQuantizeLSTM``); a ``GRU`` or ``RNN`` stays float32 and is listed in
:attr:`QuantizationInfo.float_ops`.
"""

from __future__ import annotations

import copy
import hashlib
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

__all__ = [
    "INPUT_DTYPES",
    "INPUT_NAME",
    "LATENCY_KEYS",
    "MODE_DYNAMIC",
    "MODE_STATIC",
    "OPSET",
    "OUTPUT_NAME",
    "REDUCE_RANGE",
    "ExportError",
    "QuantizationInfo",
    "export_onnx",
    "file_sha256",
    "latency_ms",
    "onnx_accuracy",
    "ort_session",
    "quantize_int8",
]

#: ONNX opset of every exported model.
OPSET = 17
#: Name of the graph's single input and output.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Input element types export_onnx accepts (images, windows, features; token ids).
INPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "int64": torch.int64}
#: QuantizationInfo.mode values.
MODE_STATIC = "static"
MODE_DYNAMIC = "dynamic"
#: Weights quantized to 7 bits in every mode, so no x86-64 kernel saturates (module docstring).
REDUCE_RANGE = True
#: Keys of latency_ms's result and the percentiles they hold.
LATENCY_KEYS: dict[str, float] = {"p50": 50.0, "p95": 95.0, "p99": 99.0}

# Recurrent operators ORT has no QDQ (static) kernel for; see the module docstring.
_RECURRENT_OPS = frozenset({"GRU", "LSTM", "RNN"})
# Recurrent operators ORT cannot quantize in either mode: they stay float32.
_FLOAT_ONLY_OPS = frozenset({"GRU", "RNN"})
# Operators whose presence shows that a graph was really quantized.
_STATIC_MARKERS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_DYNAMIC_MARKERS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "DequantizeLinear"}
)
# Calibration batch size: bounds the calibration session's memory, not its result
# (min/max calibration is the same whatever the batching).
_CALIBRATION_BATCH = 64
_HASH_CHUNK_BYTES = 1 << 20
_UNSUPPORTED_OP = re.compile(r"operator '([^']+)'")
_FAILED_NODE = re.compile(r"running (\w+) node")


class ExportError(RuntimeError):
    """An export or quantization step failed; the one-line message names the operator if known."""


@dataclass(frozen=True)
class QuantizationInfo:
    """How an int8 model was quantized, for the artifact's manifest.

    Parameters
    ----------
    mode : str
        ``"static"`` (QDQ, calibrated activation scales) or ``"dynamic"``
        (activation scales computed at run time, no calibration data).
    per_channel : bool
        One weight scale per output channel (static) or per tensor (dynamic).
    weight_type : str
        Element type of the quantized weights: ``"int8"``.
    activation_type : str
        Element type of the quantized activations: ``"int8"`` (static QDQ) or
        ``"uint8"`` (dynamic: ONNX's ``DynamicQuantizeLinear`` only produces uint8).
    calibration_source : str
        Where the calibration samples came from, e.g. ``"server-split:256"``;
        ``"none"`` in dynamic mode.
    calibration_samples : int
        Number of calibration samples used; 0 in dynamic mode.
    opset : int
        ONNX opset of the model.
    reduce_range : bool
        Weights quantized to 7 bits (``[-64, 63]``) instead of 8, as ORT recommends for
        x86-64 CPUs without VNNI: their u8 x s8 kernels (``vpmaddubsw``) add pairs of
        products in int16 and saturate with full-range weights, so the same model would
        score differently on an AVX2 device and a VNNI one. With 7-bit weights a pair
        sum fits in int16 and the fused integer kernels equal the unfused QDQ graph.
    float_ops : tuple of str, default ()
        Weight-carrying operator types left in float32 because ORT cannot quantize
        them (``GRU``, ``RNN``), sorted.
    float_nodes : tuple of str, default ()
        Names of graph nodes deliberately left in float32 (see :func:`quantize_int8`:
        the first layer of a tabular model), sorted.
    """

    mode: str
    per_channel: bool
    weight_type: str
    activation_type: str
    calibration_source: str
    calibration_samples: int
    opset: int
    reduce_range: bool
    float_ops: tuple[str, ...] = ()
    float_nodes: tuple[str, ...] = ()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], input_dtype: str, path: Path) -> Path:
    """Export ``model`` to a float32 ONNX file with TorchScript's exporter.

    The graph has one input named ``"input"`` of shape ``(batch, *input_shape)`` and
    one output named ``"logits"`` of shape ``(batch, num_classes)``; the batch axis
    is dynamic. The same weights give the same bytes (same torch and onnx versions):
    the exporter is a deterministic trace and writes no timestamps or paths.

    Parameters
    ----------
    model : torch.nn.Module
        The model to export. It is not modified: a deep copy is put in eval mode and
        traced, so the caller's training mode and weights stay as they were.
    input_shape : tuple of int
        Shape of one sample without the batch dimension, e.g. ``(1, 28, 28)``.
    input_dtype : str
        ``"float32"`` or ``"int64"`` (token ids).
    path : pathlib.Path
        Destination file; its folder must exist. Overwritten if present.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``input_dtype`` is not a key of :data:`INPUT_DTYPES` or ``input_shape`` is empty
        or has a non-positive dimension.
    ExportError
        If tracing or export fails; for an operator that opset 17 lacks the message
        names it (``operator 'aten::fft_fft' is not supported in opset 17``).
    """
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {sorted(INPUT_DTYPES)}, got {input_dtype!r}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    frozen = copy.deepcopy(model).eval()
    dummy = torch.zeros((1, *shape), dtype=INPUT_DTYPES[input_dtype])
    path = Path(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of the dynamo one,
            # which needs onnxscript; fedge pins the former (dynamo=False).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                frozen,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        match = _UNSUPPORTED_OP.search(str(exc))
        op = match.group(1) if match else "unknown"
        raise ExportError(
            f"ONNX export failed: operator {op!r} is not supported in opset {OPSET} "
            "(rewrite that part of the model with supported operators, or compute it outside the model)"
        ) from exc
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ExportError(
            f"ONNX export failed on a {(1, *shape)} {input_dtype} input: {_first_line(exc)}"
        ) from exc
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        path.unlink(missing_ok=True)
        raise ExportError(f"ONNX export produced an invalid model: {_first_line(exc)}") from exc
    return path


class _ArrayReader(CalibrationDataReader):
    """Feeds ``calibration`` to ORT's calibrator in batches of ``batch_size`` rows."""

    def __init__(self, calibration: np.ndarray, batch_size: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: np.ascontiguousarray(calibration[i : i + batch_size])}
            for i in range(0, len(calibration), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def _tabular_float_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """The first and last Gemm/MatMul of a tabular graph (input ``(N, features)`` float), sorted.

    Empty for any other graph (images, windows, tokens) or when the graph has fewer
    than three such layers (nothing would be left to quantize).
    """
    (graph_input,) = model.graph.input
    tensor = graph_input.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(tensor.shape.dim) != 2:
        return ()
    dense = [node.name for node in model.graph.node if node.op_type in {"Gemm", "MatMul"}]
    if len(dense) < 3 or not all(dense):
        return ()
    return tuple(sorted({dense[0], dense[-1]}))


def _pre_process(fp32_path: Path, out_path: Path) -> Path:
    """Shape inference + ORT's basic graph optimisation; the input itself if that fails.

    ORT recommends it before quantizing (folded constants, known shapes let more
    tensors be quantized), but quantization works on the raw export too, so a failure
    here (e.g. a shape the symbolic inference cannot follow) is not fatal.
    """
    try:
        quant_pre_process(str(fp32_path), str(out_path))
    except Exception:
        return fp32_path
    return out_path


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray | None,
    *,
    calibration_source: str = "none",
) -> QuantizationInfo:
    """Quantize a float32 ONNX model to int8 with ONNX Runtime.

    With ``calibration``: static QDQ quantization, per-channel int8 weights, int8
    activations whose per-tensor scales come from the min/max of the calibration
    samples. Without: dynamic quantization (int8 weights, uint8 activations
    quantized at run time). Weights are 7-bit (``reduce_range``) in both modes, and a
    tabular model keeps its first and last layers in float (see the module docstring).
    Graphs with a recurrent operator are always quantized dynamically. The model is
    pre-processed with ORT's ``quant_pre_process`` first when that succeeds.

    Parameters
    ----------
    fp32_path : pathlib.Path
        Float32 model, as written by :func:`export_onnx` (input named ``"input"``).
    int8_path : pathlib.Path
        Destination of the int8 model; overwritten if present.
    calibration : numpy.ndarray or None
        Calibration inputs ``(N, *input_shape)`` of the model's input dtype, N >= 1,
        e.g. 256 training samples; None for dynamic quantization.
    calibration_source : str, default "none"
        Recorded as :attr:`QuantizationInfo.calibration_source` when calibration is
        used (``"array:N"`` if left at ``"none"``); dynamic mode records ``"none"``.

    Returns
    -------
    QuantizationInfo
        The settings actually used.

    Raises
    ------
    ValueError
        If ``calibration`` is given but empty.
    ExportError
        If ORT fails (the message names the failing operator when ORT does, e.g.
        ``Gather`` for out-of-range token ids), or if the result contains no
        quantized operator (the message lists the graph's operators).
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibration is not None and len(calibration) == 0:
        raise ValueError("calibration is empty; pass at least one sample, or None for dynamic quantization")
    try:
        ops = _op_types(onnx.load(str(fp32_path)))
    except Exception as exc:
        raise ExportError(f"cannot read the fp32 ONNX model {fp32_path}: {_first_line(exc)}") from exc
    static = calibration is not None and not ops & _RECURRENT_OPS
    float_ops = tuple(sorted(ops & _FLOAT_ONLY_OPS))
    float_nodes: tuple[str, ...] = ()
    try:
        with tempfile.TemporaryDirectory(prefix="fedge-quant-") as tmp:
            source = _pre_process(fp32_path, Path(tmp) / "pre.onnx")
            if static:
                assert calibration is not None
                float_nodes = _tabular_float_nodes(onnx.load(str(source)))
                quantize_static(
                    str(source),
                    str(int8_path),
                    _ArrayReader(calibration, _CALIBRATION_BATCH),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=REDUCE_RANGE,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8,
                    nodes_to_exclude=list(float_nodes),
                )
            else:
                quantize_dynamic(
                    str(source), str(int8_path), weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE
                )
    except Exception as exc:
        match = _FAILED_NODE.search(str(exc))
        where = f" in operator {match.group(1)!r}" if match else ""
        mode = MODE_STATIC if static else MODE_DYNAMIC
        raise ExportError(f"int8 quantization ({mode}) failed{where}: {_first_line(exc)}") from exc
    int8_ops = _op_types(onnx.load(str(int8_path)))
    if not int8_ops & (_STATIC_MARKERS if static else _DYNAMIC_MARKERS):
        raise ExportError(
            f"int8 quantization left the model in float: ONNX Runtime quantizes none of its operators "
            f"({', '.join(sorted(ops))}); ship the fp32 model or add a Conv/Gemm/MatMul layer"
        )
    if static:
        assert calibration is not None
        source_name = calibration_source if calibration_source != "none" else f"array:{len(calibration)}"
        return QuantizationInfo(
            mode=MODE_STATIC,
            per_channel=True,
            weight_type="int8",
            activation_type="int8",
            calibration_source=source_name,
            calibration_samples=len(calibration),
            opset=OPSET,
            reduce_range=REDUCE_RANGE,
            float_ops=float_ops,
            float_nodes=float_nodes,
        )
    return QuantizationInfo(
        mode=MODE_DYNAMIC,
        per_channel=False,
        weight_type="int8",
        activation_type="uint8",
        calibration_source="none",
        calibration_samples=0,
        opset=OPSET,
        reduce_range=REDUCE_RANGE,
        float_ops=float_ops,
    )


def ort_session(path: Path | bytes, *, num_threads: int = 1, optimize: bool = True) -> ort.InferenceSession:
    """Open an ONNX Runtime CPU session configured like a small edge device.

    Parameters
    ----------
    path : pathlib.Path or bytes
        ONNX model file, or the model's bytes (already verified, e.g. a signed candidate).
    num_threads : int, default 1
        Intra-op threads. Inter-op threads are 1 and execution is sequential, so
        timings do not depend on how many cores the server has.
    optimize : bool, default True
        All graph optimisations (QDQ groups fused into integer kernels, as on a
        device); False evaluates the QDQ graph as written, in float: the unfused
        reference the fused kernels must agree with.

    Returns
    -------
    onnxruntime.InferenceSession
        Session on ``CPUExecutionProvider``.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers after fusion
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_accuracy(path: Path | bytes, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX classifier on ``(x, y)`` with ONNX Runtime (CPU, 1 thread).

    Parameters
    ----------
    path : pathlib.Path or bytes
        ONNX model (file or bytes) with input ``"input"`` and output ``"logits"``.
    x : numpy.ndarray
        Inputs ``(N, *input_shape)`` of the model's input dtype, N >= 1.
    y : numpy.ndarray
        Integer labels ``(N,)``.
    batch_size : int, default 256
        Samples per ``run`` call; does not change the result.

    Returns
    -------
    float
        Fraction of samples whose argmax logit equals the label, in [0, 1].

    Raises
    ------
    ValueError
        If ``x`` and ``y`` differ in length, are empty, or ``batch_size < 1``.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    session = ort_session(path)
    correct = 0
    for start in range(0, len(y), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        correct += int((np.asarray(logits).argmax(axis=1) == y[start : start + batch_size]).sum())
    return correct / len(y)


def latency_ms(path: Path, sample: np.ndarray, *, runs: int = 200, warmup: int = 20) -> dict[str, float]:
    """Single-sample inference latency percentiles, one intra-op and one inter-op thread.

    Each timed run is one ``session.run`` on ``sample`` measured with
    ``time.perf_counter_ns``; the first ``warmup`` runs (allocations, caches) are
    not timed. Percentiles are ``numpy.percentile`` (linear interpolation) of the
    ``runs`` timings.

    Parameters
    ----------
    path : pathlib.Path
        ONNX model with input ``"input"``.
    sample : numpy.ndarray
        One input of shape ``(1, *input_shape)``, of the model's input dtype.
    runs : int, default 200
        Timed runs, at least 1.
    warmup : int, default 20
        Untimed runs before them, at least 0.

    Returns
    -------
    dict of str to float
        ``{"p50": ..., "p95": ..., "p99": ...}`` in milliseconds (:data:`LATENCY_KEYS`).

    Raises
    ------
    ValueError
        If ``sample`` is not a batch of one, ``runs < 1`` or ``warmup < 0``.
    """
    if sample.ndim < 1 or sample.shape[0] != 1:
        raise ValueError(f"sample must have batch size 1, shape (1, *input_shape), got {sample.shape}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    session = ort_session(path)
    feed = {INPUT_NAME: np.ascontiguousarray(sample)}
    for _ in range(warmup):
        session.run(None, feed)
    timings_ns = np.empty(runs, dtype=np.int64)
    for i in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        timings_ns[i] = time.perf_counter_ns() - start
    timings_ms = timings_ns / 1e6
    return {key: float(np.percentile(timings_ms, q)) for key, q in LATENCY_KEYS.items()}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 digest of a file's bytes, read in 1 MiB chunks.

    Parameters
    ----------
    path : pathlib.Path
        Any file.

    Returns
    -------
    str
        64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
