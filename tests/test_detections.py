"""Detections.plot / .save and a class name per box (issue 15, Python API)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.postprocess import Detections
from detrkit.viz.draw import class_colour


def _dets(image=None):
    return Detections(boxes=torch.tensor([[10.0, 8.0, 40.0, 30.0]]), scores=torch.tensor([0.9]),
                      labels=torch.tensor([2]), category_ids=[7], label_names=["platelet"], image_size=(40, 60),
                      image=image)


def test_to_coco_names_the_class():
    [rec] = _dets().to_coco(5)
    assert rec["category_name"] == "platelet" and rec["category_id"] == 7 and rec["bbox"] == [10, 8, 30, 22]


def test_plot_draws_the_box_in_its_class_colour(tmp_path):
    image = Image.new("RGB", (60, 40), (128, 128, 128))
    drawn = np.asarray(_dets(image).plot())
    assert drawn.shape == (40, 60, 3)
    assert tuple(drawn[30, 25]) == class_colour(2)  # bottom edge of the box
    assert tuple(drawn[27, 30]) == (128, 128, 128)  # inside, below the label: untouched
    path = _dets().save(tmp_path / "a.png", image)
    assert np.array_equal(np.asarray(Image.open(path)), drawn)
    assert json.loads(_dets().save(tmp_path / "a.json").read_text())[0]["category_name"] == "platelet"
    with pytest.raises(ValueError, match="no image"):
        _dets().plot()
    with pytest.raises(ValueError, match="made on 60x40"):
        _dets().plot(Image.new("RGB", (10, 10)))
