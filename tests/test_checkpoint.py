import numpy as np
import pytest
import torch

from napari_deepcrop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor


def test_round_trip_rebuilds_the_same_model(tmp_path):
    config = DeepCropConfig(
        trunk="resnet18", head="deepmask", input_size=64, negative_clicks=False, prev_mask=False
    )
    model = DeepCropV2(config).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, meta={"note": "test"})
    loaded, payload = load_checkpoint(path)
    assert loaded.config == config
    assert payload["meta"] == {"note": "test"}
    x, planes = torch.rand(1, 3, 64, 64), torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x, planes)[0], loaded(x, planes)[0])
    torch.load(path, weights_only=True)  # plain data only


def test_half_precision_checkpoint_is_smaller_and_close(tmp_path):
    model = DeepCropV2(DeepCropConfig(input_size=64)).eval()
    full = save_checkpoint(tmp_path / "f.pt", model)
    half = save_checkpoint(tmp_path / "h.pt", model, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(missing)
    good = save_checkpoint(tmp_path / "good.pt", DeepCropV2(DeepCropConfig(input_size=64)))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a napari-deepcrop checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", DeepCropV2(DeepCropConfig(input_size=64)))
    payload = torch.load(path, weights_only=True)
    payload["config"]["trunk"] = "resnet34"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_no_partial_file_when_saving_fails(tmp_path, monkeypatch):
    model = DeepCropV2(DeepCropConfig(input_size=64))
    target = save_checkpoint(tmp_path / "m.pt", model)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_bundled_checkpoint_loads_into_a_predictor():
    p = DeepCropPredictor.from_checkpoint(device="cpu")
    p.set_image(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    mask, score = p.predict(np.array([[60, 80]]), np.array([1]))
    assert mask.shape == (120, 160)


def test_shipping_keeps_every_stage_of_a_recipe(tmp_path):
    """scripts/ship_checkpoint.py: float16 weights, the metrics, and each stage's meta nested down to the first."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "ship_checkpoint.py"
    spec = importlib.util.spec_from_file_location("ship_checkpoint", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)

    model = DeepCropV2(DeepCropConfig(input_size=64)).eval()
    init = None
    for stage in ("objects", "ladder", "focus"):
        meta = {"args": {"stage": stage, "init": str(init) if init else None}, "git_commit": f"commit-{stage}"}
        init = save_checkpoint(tmp_path / stage / "checkpoint.pt", model, meta=meta, step=7)
    (tmp_path / "grabcut.json").write_text(json.dumps({"noc@90": 4.0}))
    shipped = ship.main(
        [str(init), "-o", str(tmp_path / "shipped.pt"), "--metrics", str(tmp_path / "grabcut.json"), "--note", "n"]
    )

    loaded, payload = load_checkpoint(shipped)
    meta = payload["meta"]
    assert meta["metrics"] == {"grabcut": {"noc@90": 4.0}} and meta["note"] == "n" and meta["trained_steps"] == 7
    stages = []
    while meta:
        stages.append(meta["args"]["stage"])
        meta = meta.get("init_meta")
    assert stages == ["focus", "ladder", "objects"]
    assert all(v.dtype == torch.float16 for v in payload["model"].values() if v.is_floating_point())
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def _ship_module():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "ship_checkpoint.py"
    spec = importlib.util.spec_from_file_location("ship_checkpoint", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    return ship


def test_a_checkpoint_carries_a_first_click_network_into_the_predictor(tmp_path):
    """first_click: a second network's config and weights in the same file (float16 when shipped), loaded with
    weights_only and handed to the predictor by from_checkpoint; files without one load as before."""
    from napari_deepcrop.checkpoint import load_first_click_model, read_checkpoint

    torch.manual_seed(0)
    main = DeepCropV2(DeepCropConfig(input_size=64)).eval()
    first = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk", decoder_width=16)).eval()
    path = save_checkpoint(tmp_path / "two.pt", main, half=True, first_click_model=first, meta={"note": "two"})
    payload = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["first_click"]["model"].values() if v.is_floating_point())
    predictor = DeepCropPredictor.from_checkpoint(path, device="cpu")
    assert predictor.first_config == first.config and predictor.config == main.config
    for a, b in zip(first.state_dict().values(), predictor.first_click_model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    alone = DeepCropPredictor.from_checkpoint(save_checkpoint(tmp_path / "one.pt", main), device="cpu")
    assert alone.first_click_model is None and alone.first_nets is alone.nets
    bad = read_checkpoint(path)
    bad["first_click"]["model"].popitem()
    with pytest.raises(CheckpointError, match="first-click network's weights do not match"):
        load_first_click_model(bad, "bad.pt")
    with pytest.raises(CheckpointError, match="'first_click' entry needs a 'config' and a 'model'"):
        load_first_click_model({"first_click": {"model": {}}}, "bad.pt")


def test_shipping_with_a_first_click_network_keeps_both_and_their_provenance(tmp_path):
    ship = _ship_module()
    main = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk")).eval()
    first = DeepCropV2(DeepCropConfig(input_size=64)).eval()
    a = save_checkpoint(tmp_path / "a" / "checkpoint.pt", main, meta={"args": {"stage": "disk"}}, step=3)
    b = save_checkpoint(tmp_path / "b" / "checkpoint.pt", first, meta={"args": {"stage": "distance"}}, step=5)
    shipped = ship.main([str(a), "-o", str(tmp_path / "shipped.pt"), "--first-click-network", str(b)])
    predictor = DeepCropPredictor.from_checkpoint(shipped, device="cpu")
    assert predictor.config.click_encoding == "disk" and predictor.first_config.click_encoding == "distance"
    meta = load_checkpoint(shipped)[1]["meta"]
    assert meta["args"]["stage"] == "disk" and meta["first_click_meta"]["args"]["stage"] == "distance"
