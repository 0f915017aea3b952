import pytest
import torch

from napari_deepcrop.model import HEADS, TRUNKS, DeepCropConfig, DeepCropV2


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("trunk", TRUNKS)
def test_forward_backward_shapes(trunk, head):
    config = DeepCropConfig(trunk=trunk, head=head, input_size=64)
    model = DeepCropV2(config)
    image = torch.rand(2, 3, 64, 64)
    planes = torch.rand(2, config.click_planes, 64, 64)
    mask, score = model(image, planes)
    assert mask.shape == (2, 1, 64, 64)
    assert score.shape == (2,)
    (mask.mean() + score.mean()).backward()
    first = model.trunk.first_conv.weight
    assert first.shape[1] == 3 + config.click_planes
    assert first.grad is not None and first.grad[:, 3:].abs().sum() > 0, "click planes must reach the trunk"


def test_click_planes_follow_config():
    assert DeepCropConfig().click_planes == 3
    assert DeepCropConfig(negative_clicks=False, prev_mask=False).click_planes == 1  # the report's DeepCropV2
    assert (
        DeepCropConfig(positive_clicks=False, negative_clicks=False, prev_mask=False).click_planes == 0
    )  # DeepMask


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="trunk"):
        DeepCropConfig(trunk="vgg16")
    with pytest.raises(ValueError, match="multiple of 16"):
        DeepCropConfig(input_size=100)
    with pytest.raises(ValueError, match="unknown DeepCropConfig keys"):
        DeepCropConfig.from_dict({"trunk": "resnet18", "colour": "red"})


def test_wrong_input_size_is_a_clear_error():
    model = DeepCropV2(DeepCropConfig(input_size=64))
    with pytest.raises(ValueError, match="64x64"):
        model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_forward_backward_cuda_amp():
    config = DeepCropConfig(input_size=64)
    model = DeepCropV2(config).cuda()
    with torch.autocast("cuda"):
        mask, score = model(torch.rand(2, 3, 64, 64, device="cuda"), torch.rand(2, 3, 64, 64, device="cuda"))
    (mask.float().mean() + score.float().mean()).backward()
    assert mask.shape == (2, 1, 64, 64)
