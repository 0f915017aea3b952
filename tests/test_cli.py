import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from synthetic import disk_image

from napari_deepcrop.checkpoint import save_checkpoint
from napari_deepcrop.cli import main


@pytest.mark.slow
def test_segment_writes_the_mask(tmp_path, disk_model, capsys):
    checkpoint = save_checkpoint(tmp_path / "disk.pt", disk_model)
    image, mask = disk_image(300, (150, 120), 45, seed=77)
    iio.imwrite(tmp_path / "image.png", image)
    out = tmp_path / "out" / "mask.png"
    main(["segment", str(tmp_path / "image.png"), "--click", "150,120", "-o", str(out),
          "--checkpoint", str(checkpoint), "--device", "cpu"])
    written = iio.imread(out) > 0
    assert written.shape == mask.shape
    assert (written & mask).sum() / (written | mask).sum() > 0.8
    assert "mask 1 of 4, predicted IoU" in capsys.readouterr().out  # sides 64, 128, 256, 512 on 300 px


def test_segment_gives_the_first_clicks_other_masks(tmp_path, disk_model, capsys):
    from napari_deepcrop.predictor import DeepCropPredictor

    checkpoint = save_checkpoint(tmp_path / "disk.pt", disk_model)
    image, _ = disk_image(300, (150, 120), 45, seed=77)
    iio.imwrite(tmp_path / "image.png", image)
    predictor = DeepCropPredictor(disk_model, device="cpu")
    predictor.set_image(image)
    count = predictor.alternatives()
    for k in range(count):
        out = tmp_path / f"mask{k}.png"
        main(["segment", str(tmp_path / "image.png"), "--click", "150,120", "-o", str(out), "--alternative", str(k),
              "--checkpoint", str(checkpoint), "--device", "cpu"])  # fmt: skip
        assert f"mask {k + 1} of {count}," in capsys.readouterr().out
        expected, _ = predictor.predict(np.array([[150, 120]]), np.array([1]), alternative=k)
        np.testing.assert_array_equal(iio.imread(out) > 0, expected)
    with pytest.raises(SystemExit, match=rf"--alternative must be in 0\.\.{count - 1} on this image"):
        main(["segment", str(tmp_path / "image.png"), "--click", "150,120", "-o", str(tmp_path / "bad.png"),
              "--alternative", str(count), "--checkpoint", str(checkpoint), "--device", "cpu"])  # fmt: skip
    assert not (tmp_path / "bad.png").exists()


def test_segment_errors_are_messages_not_tracebacks(tmp_path):
    image, _ = disk_image(64, (32, 32), 10)
    iio.imwrite(tmp_path / "image.png", image)
    with pytest.raises(SystemExit, match="outside the image"):
        main(["segment", str(tmp_path / "image.png"), "--click", "100,5", "-o", str(tmp_path / "m.png")])
    with pytest.raises(SystemExit, match="at least one --click"):
        main(["segment", str(tmp_path / "image.png"), "-o", str(tmp_path / "m.png")])
    with pytest.raises(SystemExit, match="not found"):
        main(["segment", str(tmp_path / "image.png"), "--click", "5,5", "-o", str(tmp_path / "m.png"),
              "--checkpoint", str(tmp_path / "missing.pt")])
    assert not (tmp_path / "m.png").exists()


def test_export_and_coco_info(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    label = np.zeros((40, 50), np.uint16)
    label[5:15, 5:20], label[20:35, 30:45] = 1, 7
    iio.imwrite(images / "a.png", np.full((40, 50, 3), 90, np.uint8))
    iio.imwrite(labels / "a.png", label)
    main(["export", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "out")])
    main(["coco-info", str(tmp_path / "out" / "annotations.json")])
    out = capsys.readouterr().out
    assert "2" in out and "annotations.json" in out
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["export", "--images", str(images), "--labels", str(labels), "-o", str(tmp_path / "out")])


def test_train_and_eval_are_reachable_from_the_command():
    for command in ("train", "eval"):
        result = subprocess.run([sys.executable, "-m", "napari_deepcrop.cli", command, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--checkpoint" in result.stdout or "--data-path" in result.stdout
