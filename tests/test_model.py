import copy
import threading

import pytest
import torch

from napari_deepcrop.model import HEADS, SCORE_HEADS, TRUNK_STRIDES, TRUNKS, DeepCropConfig, DeepCropV2


@pytest.mark.parametrize("trunk_stride", TRUNK_STRIDES)
@pytest.mark.parametrize("score_head", SCORE_HEADS)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("trunk", TRUNKS)
def test_forward_backward_shapes(trunk, head, score_head, trunk_stride):
    config = DeepCropConfig(trunk=trunk, head=head, input_size=64, score_head=score_head, trunk_stride=trunk_stride)
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
    assert all(p.grad is not None for p in model.score_head.parameters())
    assert all(p.grad is not None for p in model.mask_head.parameters()), "every trunk stage reaches the mask"


@pytest.mark.parametrize("trunk", ["resnet18", "efficientnet_lite0"])
def test_a_stride_32_trunk_adds_its_deepest_stage_and_keeps_the_others(trunk):
    torch.manual_seed(0)
    x = torch.rand(1, 6, 128, 128)
    short = DeepCropV2(DeepCropConfig(trunk=trunk, input_size=128)).trunk.eval()
    deep = DeepCropV2(DeepCropConfig(trunk=trunk, input_size=128, trunk_stride=32)).trunk.eval()
    deep.load_state_dict(short.state_dict(), strict=False)  # the stages both have: the same weights
    with torch.no_grad():
        feats_short, feats_deep = short(x), deep(x)
    assert [f.shape[-1] for f in feats_deep] == [64, 32, 16, 8, 4]
    assert deep.channels[:4] == short.channels and len(deep.channels) == 5
    for a, b in zip(feats_short, feats_deep[:4], strict=True):
        assert torch.equal(a, b)
    head = DeepCropV2(DeepCropConfig(trunk=trunk, input_size=128, trunk_stride=32)).mask_head
    assert len(head.skips) == len(head.merges) == 4  # the extra merge works at stride 16


def test_the_stride_16_refinement_head_keeps_its_layout():
    """The bundled checkpoints' keys and shapes (trunk_stride=16, the default) are those of before trunk_stride."""
    shapes = {k: tuple(v.shape) for k, v in DeepCropV2(DeepCropConfig(input_size=64)).mask_head.state_dict().items()}
    assert shapes["skips.2.0.weight"] == (64, 128, 3, 3) and shapes["merges.0.0.weight"] == (64, 192, 3, 3)
    assert shapes["merges.2.0.weight"] == (32, 64, 3, 3) and "skips.3.0.weight" not in shapes


def test_the_mask_score_head_sees_a_mask_cut_by_the_crop_border():
    """Two masks of one area and the same features, one in the middle, one on the border: different scores."""
    torch.manual_seed(0)
    head = DeepCropV2(DeepCropConfig(trunk="resnet18", input_size=64, score_head="mask")).score_head
    feat = torch.rand(2, 256, 4, 4)
    logits = torch.full((2, 1, 64, 64), -8.0)
    logits[0, :, 24:40, 24:40] = 8.0
    logits[1, :, 0:16, 24:40] = 8.0
    scores = head(feat[:1].expand(2, -1, -1, -1), logits)
    assert abs(scores[0] - scores[1]) > 1e-4
    pooled = DeepCropV2(DeepCropConfig(trunk="resnet18", input_size=64)).score_head
    same = pooled(feat[:1].expand(2, -1, -1, -1), logits)
    assert torch.allclose(same[0], same[1])  # the pooled head cannot tell them apart


def test_with_score_head_swaps_only_the_score_head():
    torch.manual_seed(0)
    model = DeepCropV2(DeepCropConfig(input_size=64)).eval()
    swapped = model.with_score_head("mask").eval()
    assert swapped.config.score_head == "mask" and model.config.score_head == "pooled"
    image, planes = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        (mask_a, _), (mask_b, _) = model(image, planes), swapped(image, planes)
    assert torch.equal(mask_a, mask_b)
    assert isinstance(swapped.score_head, type(DeepCropV2(swapped.config).score_head))


@pytest.mark.parametrize("trunk", ["resnet18", "efficientnet_lite0"])
def test_a_refine_size_network_takes_both_input_sizes_and_no_other(trunk):
    config = DeepCropConfig(trunk=trunk, input_size=64, refine_size=96)
    assert config.sizes == (64, 96) and config.refinement_size == 96
    assert DeepCropConfig(input_size=64).refinement_size == 64
    model = DeepCropV2(config)
    for size in (64, 96):
        mask, score = model(torch.rand(2, 3, size, size), torch.rand(2, config.click_planes, size, size))
        assert mask.shape == (2, 1, size, size) and score.shape == (2,)
    with pytest.raises(ValueError, match="64x64 or 96x96"):
        model(torch.rand(1, 3, 80, 80), torch.rand(1, 3, 80, 80))
    with pytest.raises(ValueError, match="64x64 or 96x96"):
        model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 96, 96))


def test_each_input_size_keeps_its_own_batch_norm_statistics():
    """Training at one size moves that size's running statistics only; evaluation at a size uses its own."""
    torch.manual_seed(0)
    model = DeepCropV2(DeepCropConfig(input_size=64, refine_size=96, decoder_width=8))
    bn = model._batch_norms[0]
    before = {s: getattr(bn, f"running_mean_{s}").clone() for s in (64, 96)}
    model.train()
    model(torch.rand(2, 3, 96, 96) * 3, torch.rand(2, 3, 96, 96))
    assert torch.equal(bn.running_mean_64, before[64]) and not torch.equal(bn.running_mean_96, before[96])
    model.eval()
    image, planes = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        at_64, _ = model(image, planes)
        model(torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))  # loads the 96 statistics
        again, _ = model(image, planes)
        assert torch.equal(bn.running_mean, bn.running_mean_64) and torch.equal(at_64, again)
        # the same weights with the statistics of the 96-px training pass give another mask at 64 px
        state = model.state_dict()
        shared = DeepCropV2(DeepCropConfig(input_size=64, decoder_width=8)).eval()
        shared.load_state_dict({k: state.get(f"{k}_96", v) for k, v in state.items() if not k.endswith(("_64", "_96"))})
        assert not torch.equal(shared(image, planes)[0], at_64)


def test_passes_at_two_sizes_from_two_threads_each_use_their_own_statistics():
    """A click (first-click size) predicted while a stack propagates (refinement size) shares the network: each
    pass must see its own size's statistics all through, as it does alone."""
    torch.manual_seed(0)
    model = DeepCropV2(DeepCropConfig(input_size=64, refine_size=96, decoder_width=8)).eval()
    for bn in model._batch_norms:  # statistics far apart per size, so that a pass on the wrong ones shows
        bn.running_mean_64.uniform_(-1, 1)
        bn.running_mean_96.uniform_(-1, 1)
        bn.running_var_96.uniform_(2, 4)
    inputs = {s: (torch.rand(2, 3, s, s), torch.rand(2, 3, s, s)) for s in (64, 96)}
    with torch.no_grad():
        alone = {s: model(*inputs[s])[0] for s in (64, 96)}
    wrong = []

    def passes(size: int) -> None:
        with torch.no_grad():
            for _ in range(40):
                if not torch.equal(model(*inputs[size])[0], alone[size]):
                    wrong.append(size)

    threads = [threading.Thread(target=passes, args=(s,)) for s in (64, 96)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 80 passes ran on another size's statistics"
    assert copy.deepcopy(model)(*inputs[96])[0].equal(alone[96])  # a copy has its own lock


def _distinct_statistics(model: DeepCropV2, sizes) -> None:
    """Batch norm statistics and affine weights far from the identity, and different for each size, so that a
    batch norm folded wrongly, or with another size's statistics, shows in the outputs."""
    with torch.no_grad():
        for bn in model._batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            for size in sizes:
                getattr(bn, f"running_mean_{size}" if len(sizes) > 1 else "running_mean").uniform_(-0.5, 0.5)
                getattr(bn, f"running_var_{size}" if len(sizes) > 1 else "running_var").uniform_(0.5, 2.0)


@pytest.mark.parametrize(("head", "refine_size"), [("deepmask", None), ("refine", None), ("refine", 96)])
@pytest.mark.parametrize(
    ("trunk", "trunk_stride"),
    [("resnet18", 16), ("resnet50", 16), ("efficientnet_lite0", 16), ("efficientnet_lite0", 32)],
)
def test_a_folded_copy_has_no_batch_norm_and_the_networks_outputs_at_its_size(trunk, trunk_stride, head, refine_size):
    torch.manual_seed(0)
    config = DeepCropConfig(trunk=trunk, head=head, input_size=64, refine_size=refine_size, trunk_stride=trunk_stride)
    model = DeepCropV2(config).eval()
    _distinct_statistics(model, model.config.sizes)
    for size in model.config.sizes:
        folded = model.folded(size)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        inputs = (torch.rand(2, 3, size, size), torch.rand(2, model.config.click_planes, size, size))
        with torch.no_grad():
            (mask, score), (f_mask, f_score) = model(*inputs), folded(*inputs)
        assert mask.abs().max() > 0.1  # the comparison below is not between two near-zero outputs
        torch.testing.assert_close(f_mask, mask, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f_score, score, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the network itself is unchanged"


def test_a_folded_copy_takes_its_size_alone_and_refuses_training():
    model = DeepCropV2(DeepCropConfig(input_size=64, refine_size=96, decoder_width=8)).eval()
    folded = model.folded(96)
    with pytest.raises(ValueError, match="folded for 96x96 inputs, got 64"):
        folded(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="for inference"):
        folded.train()(torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))
    with pytest.raises(ValueError, match="64 or 96 pixels, not 128"):
        model.folded(128)


def test_with_refine_size_keeps_the_weights_and_each_sizes_statistics():
    torch.manual_seed(0)
    model = DeepCropV2(DeepCropConfig(input_size=64, decoder_width=8)).eval()
    for bn in model._batch_norms:  # trained statistics, not the initial 0 / 1
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    focus = model.with_refine_size(96).eval()
    assert focus.config.refine_size == 96 and model.config.refine_size is None
    image, planes = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image, planes)[0], focus(image, planes)[0])
        assert focus(torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))[0].shape[-1] == 96
    bn = focus._batch_norms[0]
    assert torch.equal(bn.running_var_96, model._batch_norms[0].running_var)
    bn.running_var_64.fill_(3.0)
    back = focus.with_refine_size(None)  # one size again: the input size's statistics
    assert sorted(back.state_dict()) == sorted(model.state_dict())
    assert (back._batch_norms[0].running_var == 3.0).all()


def test_refine_size_is_checked():
    with pytest.raises(ValueError, match="refine_size must be a multiple of 16 and >= input_size"):
        DeepCropConfig(input_size=128, refine_size=100)
    with pytest.raises(ValueError, match="refine_size must be a multiple of 16 and >= input_size"):
        DeepCropConfig(input_size=128, refine_size=64)
    with pytest.raises(ValueError, match="deepmask head has a fixed input size"):
        DeepCropConfig(head="deepmask", input_size=64, refine_size=96)
    assert DeepCropConfig.from_dict(DeepCropConfig(input_size=64, refine_size=96).to_dict()).refine_size == 96


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
    with pytest.raises(ValueError, match="trunk_stride must be one of"):
        DeepCropConfig(trunk_stride=8)
    with pytest.raises(ValueError, match="input_size must be a multiple of 32"):
        DeepCropConfig(input_size=80, trunk_stride=32)
    with pytest.raises(ValueError, match="refine_size must be a multiple of 32"):
        DeepCropConfig(input_size=64, refine_size=80, trunk_stride=32)
    assert DeepCropConfig.from_dict(DeepCropConfig(input_size=64, trunk_stride=32).to_dict()).trunk_stride == 32
    with pytest.raises(ValueError, match="score_head"):
        DeepCropConfig(score_head="mlp")
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
