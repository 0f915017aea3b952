"""The npe2 manifest: valid, found through the installed distribution, and pointing at importable code."""

from __future__ import annotations

import numpy as np
import pytest
from npe2 import PluginManifest


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution("napari-deepcrop")  # parsing validates, as `npe2 validate`


def test_manifest_contributions(manifest):
    c = manifest.contributions
    commands = {cmd.id: cmd.python_name for cmd in c.commands}
    assert manifest.name == "napari-deepcrop"
    assert commands["napari-deepcrop.make_widget"] == "napari_deepcrop._widget:DeepCropWidget"
    assert [w.command for w in c.widgets] == ["napari-deepcrop.make_widget"]
    assert [m.command for m in c.menus["napari/layers/segment"]] == ["napari-deepcrop.make_widget"]
    (reader,) = c.readers
    assert commands[reader.command] == "napari_deepcrop._reader:get_reader"
    assert reader.filename_patterns == ["*.json"] and not reader.accepts_directories
    (writer,) = c.writers
    assert commands[writer.command] == "napari_deepcrop._writer:write_coco"
    assert writer.filename_extensions == [".json"] and writer.layer_types == ["labels", "image*"]
    assert {s.key for s in c.sample_data} == {"coffee", "coins"}


def test_every_python_name_imports(manifest):
    manifest.validate_imports()  # `npe2 validate --imports napari-deepcrop`


def test_sample_data_is_local():
    from napari_deepcrop import _sample_data

    for make in (_sample_data.coffee, _sample_data.coins):
        ((data, meta, layer_type),) = make()
        assert layer_type == "image" and data.dtype == np.uint8 and min(data.shape[:2]) >= 300
        assert meta["name"] in ("coffee", "coins")
