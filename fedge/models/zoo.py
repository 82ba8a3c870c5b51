"""The zoo's model classes: small, dropout-free, batch-norm-free networks for edge devices.

Every model outputs logits of shape ``(N, num_classes)`` and uses only operators
that export to ONNX opset 17 and quantise with ONNX Runtime static QDQ
(Conv, Gemm/MatMul, Relu, MaxPool, Flatten, Gather, GRU). There is no dropout
(it would draw from the global RNG during training) and no batch-norm (its running
statistics do not average meaningfully across clients); the nets are shallow
enough to train without normalisation.

Downsampling is mostly by stride-2 convolutions: on the CPU PyTorch's max-pool
over NCHW tensors costs as much as the convolution before it, and a strided
convolution computes four times fewer outputs. ``Cnn28`` keeps one max-pool,
where it measurably buys accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from fedge.models.base import ZooModel

__all__ = ["CharGru", "Cnn8", "Cnn28", "Cnn32", "Har1d", "Mlp"]


def _is_positive_shape(input_shape: tuple[int, ...], ndim: int) -> bool:
    return len(input_shape) == ndim and all(int(d) >= 1 for d in input_shape)


class Cnn8(ZooModel):
    """Small CNN for 8x8 grey images (scikit-learn digits), input ``(N, 1, 8, 8)`` float32.

    ``conv3x3(16) -> ReLU -> conv3x3/2(32) -> ReLU -> flatten(512) -> linear(num_classes)``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    """

    input_shape_hint = "(1, 8, 8) float32"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return tuple(input_shape) == (1, 8, 8)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> Cnn8:
        return cls(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class Cnn28(ZooModel):
    """Small CNN for 28x28 grey images (MNIST, Fashion-MNIST, FEMNIST), input ``(N, 1, 28, 28)``.

    ``conv3x3/2(8) -> ReLU -> conv3x3(16) -> maxpool2 -> ReLU -> flatten(784)
    -> linear(64) -> ReLU -> linear(num_classes)``: 52,138 parameters for 10 classes
    and 0.29 M multiply-adds per sample (14,112 + 225,792 + 50,176 + 640). A
    stride-2 first convolution halves the image before the costlier 8-to-16
    convolution; the max-pool after it buys about half a point of MNIST accuracy
    over a second strided convolution (98.3% vs 97.8% after two epochs). ReLU after
    the pool equals ReLU before it (both are monotone) and touches four times
    fewer values.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    """

    input_shape_hint = "(1, 28, 28) float32"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return tuple(input_shape) == (1, 28, 28)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> Cnn28:
        return cls(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class Cnn32(ZooModel):
    """Small CNN for 32x32 RGB images (CIFAR-10), input ``(N, 3, 32, 32)`` float32.

    ``conv3x3(16) -> conv3x3/2(32) -> conv3x3/2(64) -> conv3x3/2(64)`` each followed
    by ReLU, then ``flatten(1024) -> linear(128) -> ReLU -> linear(num_classes)``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    """

    input_shape_hint = "(3, 32, 32) float32"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return tuple(input_shape) == (3, 32, 32)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> Cnn32:
        return cls(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.conv4(x))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class Mlp(ZooModel):
    """Multi-layer perceptron for tabular data, input ``(N, num_features)`` float32.

    ``linear(64) -> ReLU -> linear(64) -> ReLU -> linear(num_classes)``.

    Parameters
    ----------
    num_features : int
        Number of input features per sample.
    num_classes : int
        Number of output logits.
    """

    input_shape_hint = "(num_features,) float32"

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return _is_positive_shape(input_shape, 1)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> Mlp:
        return cls(int(input_shape[0]), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class Har1d(ZooModel):
    """1-D CNN for inertial-sensor windows (HAR), input ``(N, num_channels, num_timesteps)``.

    Made for 6 channels (3-axis accelerometer + gyroscope) by 128 timesteps
    (2.56 s at 50 Hz). ``conv5/2(16) -> conv5/2(32) -> conv5/2(64)`` each followed
    by ReLU, each halving time (``ceil(T/2)``), then ``flatten(64 * ceil(T/8))
    -> linear(64) -> ReLU -> linear(num_classes)``.

    Parameters
    ----------
    num_channels : int
        Number of sensor channels per timestep.
    num_timesteps : int
        Window length in samples.
    num_classes : int
        Number of output logits.
    """

    input_shape_hint = "(num_channels, num_timesteps) float32, e.g. (6, 128)"

    def __init__(self, num_channels: int, num_timesteps: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(num_channels, 16, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(16, 32, kernel_size=5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(32, 64, kernel_size=5, stride=2, padding=2)
        # Each kernel-5, stride-2, pad-2 convolution maps T timesteps to ceil(T / 2).
        out_steps = num_timesteps
        for _ in range(3):
            out_steps = -(-out_steps // 2)
        self.fc1 = nn.Linear(64 * out_steps, 64)
        self.fc2 = nn.Linear(64, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return _is_positive_shape(input_shape, 2)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> Har1d:
        return cls(int(input_shape[0]), int(input_shape[1]), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class CharGru(ZooModel):
    """GRU for next-character prediction, input ``(N, seq_len)`` int64 token ids.

    ``embedding(vocab_size, 8) -> GRU(8, 128) -> linear(num_classes)`` on the last
    step, the shape of LEAF's Shakespeare model with a GRU for its LSTM and one
    narrower layer for CPU speed (Caldas et al., 2018, arXiv:1812.01097).

    Parameters
    ----------
    vocab_size : int
        Number of distinct token ids; inputs must lie in ``[0, vocab_size)``.
    num_classes : int
        Number of output logits (usually ``vocab_size``).
    embedding_dim : int, default 8
        Width of the token embedding.
    hidden_size : int, default 128
        Width of the GRU state.
    num_layers : int, default 1
        Number of stacked GRU layers.
    """

    input_shape_hint = "(seq_len,) int64 token ids, e.g. (80,)"

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embedding_dim: int = 8,
        hidden_size: int = 128,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.gru = nn.GRU(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        return _is_positive_shape(input_shape, 1)

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> CharGru:
        return cls(vocab_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embedding(x))
        return self.fc(out[:, -1, :])
