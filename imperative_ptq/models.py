"""Small reference models for demos, tests and benchmarks (MNIST-sized)."""

from __future__ import annotations

import numpy as np
import paddle
from tqdm import tqdm
from paddle import nn

__all__ = [
    "EncoderBlock", "LeNet", "MnistConvNet", "MnistMobileNet", "MnistSequenceEncoder", "Reshape",
    "SpaceToDepth", "VerySimpleNet", "train_classifier",
]


class VerySimpleNet(nn.Layer):
    """The classic 784-100-100-10 MLP."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(784, 100)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(100, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class LeNet(nn.Layer):
    """A LeNet-style CNN: two conv/BN/ReLU/pool stages and two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(1, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm2D(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2D(2)
        self.conv2 = nn.Conv2D(16, 32, 5)
        self.bn2 = nn.BatchNorm2D(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2D(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 5 * 5, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class SpaceToDepth(nn.Layer):
    """Folds each ``block x block`` pixel patch into channels: ``[N, C, H, W]`` ->
    ``[N, C * block**2, H / block, W / block]``, in ``pixel_unshuffle``'s channel order.

    Written as reshape/transpose/reshape, not ``F.pixel_unshuffle``: Paddle Lite has no ARM
    kernel for ``pixel_unshuffle`` (its ``opt`` refuses the program), while every runtime has
    reshape and transpose.
    """

    def __init__(self, block: int = 2) -> None:
        super().__init__()
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.block = block

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if x.ndim != 4:
            raise ValueError(f"SpaceToDepth takes [N, C, H, W] inputs, got shape {x.shape}")
        _, channels, height, width = x.shape
        b = self.block
        if height % b or width % b:  # -1 (dynamic) never divides: a static size is needed
            raise ValueError(
                f"SpaceToDepth(block={b}) needs H and W divisible by {b}, got shape {x.shape}"
            )
        blocks = x.reshape([-1, channels, height // b, b, width // b, b])
        return blocks.transpose([0, 1, 3, 5, 2, 4]).reshape(
            [-1, channels * b * b, height // b, width // b]
        )


class Reshape(nn.Layer):
    """``x.reshape(shape)`` as a layer (``-1``: inferred, ``0``: copied from the input).

    Ends :class:`MnistConvNet` instead of ``nn.Flatten``: Paddle Lite 2.13's ``opt`` crashes
    (segmentation fault) on a program whose output comes from a flatten op.
    """

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x.reshape(self.shape)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Layer]:
    return [
        nn.Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias_attr=False),
        nn.BatchNorm2D(out_channels),
        nn.ReLU(),
    ]


class MnistConvNet(nn.Sequential):
    """An MNIST CNN laid out for int8 CPU kernels (oneDNN, VNNI).

    LeNet gains little from int8 (1.3x at batch 64): its first conv reads one channel while
    VNNI multiplies groups of four, its int8 max-pool over 16 channels is slower than the fp32
    one, and its convs are too small to hide per-op overhead. Here the 28x28 image is folded
    into 4 channels of 14x14 (:class:`SpaceToDepth`), the first down-sampling is a strided
    conv, the convs that carry the compute are wide, and the classifier is a conv over the
    pooled 3x3 map (a Linear in effect) that reads the int8 pooling output directly, where a
    Flatten + Linear head costs a dequantize, a flatten and a quantize. Accuracy and int8
    speed-up are in docs/results.md.

    Args:
        num_classes: Number of outputs.
        channels: Widths of the 14x14 conv and of the two 7x7 convs. Narrower nets train
            faster but spend more of their int8 time in per-op overhead.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (64, 160)) -> None:
        if len(channels) != 2 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        narrow, wide = channels
        super().__init__(
            SpaceToDepth(2),  # [N, 4, 14, 14]
            *_conv_bn_relu(4, narrow),
            *_conv_bn_relu(narrow, wide, stride=2),  # [N, wide, 7, 7]
            *_conv_bn_relu(wide, wide),
            nn.MaxPool2D(2),  # [N, wide, 3, 3]
            nn.Conv2D(wide, num_classes, 3),  # a Linear over the 3x3 map: [N, classes, 1, 1]
            Reshape([-1, num_classes]),
        )


def _inverted_residual(
    in_channels: int, out_channels: int, expansion: int, stride: int,
    activation: type[nn.Layer] = nn.ReLU,
) -> list[nn.Layer]:
    """MobileNetV2's block without its residual add: 1x1 expand, 3x3 depthwise, 1x1 linear
    projection, each with a BatchNorm."""
    hidden = in_channels * expansion
    return [
        nn.Conv2D(in_channels, hidden, 1, bias_attr=False), nn.BatchNorm2D(hidden), activation(),
        nn.Conv2D(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias_attr=False),
        nn.BatchNorm2D(hidden), activation(),
        nn.Conv2D(hidden, out_channels, 1, bias_attr=False), nn.BatchNorm2D(out_channels),
    ]


class MnistMobileNet(nn.Sequential):
    """A MobileNetV2-style depthwise-separable CNN for MNIST, small enough to train in minutes.

    A strided stem, three inverted-residual blocks (expand, depthwise, linear projection; no
    residual adds, so the whole body is one ``nn.Sequential`` chain that cross-layer
    equalization finds), global average pooling and a 1x1 conv classifier. ReLU by default;
    ``relu6=True`` uses MobileNetV2's ReLU6, which equalization crosses only with
    ``relu6="clip"``.

    Args:
        num_classes: Number of outputs.
        width: Channels of the stem; the blocks use ``width * 1.5`` and ``width * 2``.
        relu6: ReLU6 activations instead of ReLU.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, relu6: bool = False) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"width must be an even int >= 2, got {width!r}")
        middle, wide = width * 3 // 2, width * 2
        activation = nn.ReLU6 if relu6 else nn.ReLU
        super().__init__(
            nn.Conv2D(1, width, 3, stride=2, padding=1, bias_attr=False),  # [N, width, 14, 14]
            nn.BatchNorm2D(width), activation(),
            *_inverted_residual(width, middle, 4, 1, activation),
            *_inverted_residual(middle, wide, 4, 2, activation),  # [N, wide, 7, 7]
            *_inverted_residual(wide, wide, 4, 1, activation),
            nn.AdaptiveAvgPool2D(1),
            nn.Conv2D(wide, num_classes, 1),
            Reshape([-1, num_classes]),
        )


class EncoderBlock(nn.Layer):
    """A pre-norm transformer encoder block: LayerNorm -> q, k, v -> attention -> projection,
    LayerNorm -> Linear -> ReLU -> Linear, each with a residual add."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, tokens, width = x.shape
        h = self.norm1(x)

        def split(t: paddle.Tensor) -> paddle.Tensor:
            return t.reshape([-1, tokens, self.heads, width // self.heads]).transpose([0, 2, 1, 3])

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        attention = paddle.nn.functional.softmax(
            paddle.matmul(q, k, transpose_y=True) / float(np.sqrt(width // self.heads)), axis=-1
        )
        mixed = paddle.matmul(attention, v).transpose([0, 2, 1, 3]).reshape([-1, tokens, width])
        x = x + self.proj(mixed)
        return x + self.fc2(self.relu(self.fc1(self.norm2(x))))

    def smoothing_groups(self, prefix: str) -> list[list[str]]:
        """SmoothQuant groups: each LayerNorm with the Linears reading it."""
        return [
            [f"{prefix}norm1", f"{prefix}q", f"{prefix}k", f"{prefix}v"],
            [f"{prefix}norm2", f"{prefix}fc1"],
        ]


class MnistSequenceEncoder(nn.Layer):
    """A small transformer encoder reading an MNIST image as a sequence of 28 rows.

    Args:
        num_classes: Number of outputs.
        width: Token width.
        depth: Encoder blocks.
        heads: Attention heads.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = self.create_parameter(
            [1, 28, width], default_initializer=nn.initializer.Normal(std=0.02)
        )
        self.blocks = nn.LayerList([EncoderBlock(width, heads, 2 * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.embed(x.reshape([-1, 28, 28])) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))

    def smoothing_groups(self) -> list[list[str]]:
        """SmoothQuant groups of every block (and the final LayerNorm with the head)."""
        groups = [g for i, b in enumerate(self.blocks) for g in b.smoothing_groups(f"blocks.{i}.")]
        return groups


def train_classifier(
    model: nn.Layer,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 2,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> nn.Layer:
    """Trains ``model`` in place with Adam and a cosine schedule; returns it in eval mode.

    Args:
        model: The classifier.
        images: ``[N, ...]`` float32 inputs.
        labels: ``[N]`` int64 labels.
        epochs: Passes over the data.
        batch_size: Batch size.
        learning_rate: Peak learning rate.
        seed: Seed for initialisation-independent shuffling.
        progress: Show a tqdm progress bar.
    """
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(images) // batch_size
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, epochs * steps_per_epoch)
    optimizer = paddle.optimizer.Adam(schedule, parameters=model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        batches = range(steps_per_epoch)
        for step in tqdm(batches, desc="training", disable=not progress, leave=False):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = loss_fn(model(paddle.to_tensor(images[index])), paddle.to_tensor(labels[index]))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            schedule.step()
    model.eval()
    return model
