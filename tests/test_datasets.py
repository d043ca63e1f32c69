"""Datasets: class folders, flat folders, .npz arrays, the embedded Fashion-MNIST subset, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fae_cli.data.datasets import open_images
from fae_cli.errors import FaeError
from fae_cli.recipe import DataConfig


def _save(path, value, mode="RGB", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "imagenet"
    _save(root / "n02" / "b.png", (0, 0, 200))
    _save(root / "n02" / "a.JPEG", (0, 0, 100))
    _save(root / "n01" / "x.png", (50, 0, 0))
    _save(root / "n01" / "deep" / "y.png", (60, 0, 0))
    (root / ".cache").mkdir()
    _save(root / ".cache" / "z.png", (1, 1, 1))
    return root


def test_class_folders_labels_sorted_by_name(class_folder):
    dataset = open_images(DataConfig(source=str(class_folder), image_size=8))
    assert dataset.class_names == ["n01", "n02"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert [dataset.name(i) for i in range(4)] == ["n01/deep/y.png", "n01/x.png", "n02/a.JPEG", "n02/b.png"]


def test_item_is_uint8_square_and_label(class_folder):
    image, label = open_images(DataConfig(source=str(class_folder), image_size=8))[2]
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 8, 8)
    assert label == 1
    assert image[2].unique().tolist() == [100]


def test_flat_folder_unlabelled(tmp_path):
    for index in range(3):
        _save(tmp_path / f"{index}.png", (index, index, index))
    dataset = open_images(DataConfig(source=str(tmp_path), image_size=8))
    assert len(dataset) == 3
    assert dataset.num_classes == 0
    assert dataset[1][1] == -1


def test_holdout_evenly_spaced_in_sorted_order(tmp_path):
    for index in range(5):
        _save(tmp_path / f"{index}.png", (index, 0, 0))
    config = DataConfig(source=str(tmp_path), image_size=8, holdout=2, limit=2)
    train = open_images(config, "train")
    holdout = open_images(config, "holdout")
    # Holdout: the middles of two bins of 2.5 rows, floor(1.25) and floor(3.75). Train keeps
    # rows 0, 2, 4, and the limit of 2 takes the middles of two bins of 1.5 of them: 0 and 4.
    assert [holdout.name(i) for i in range(len(holdout))] == ["1.png", "3.png"]
    assert [train.name(i) for i in range(len(train))] == ["0.png", "4.png"]
    assert holdout.rows.tolist() == [1, 3]
    assert holdout.describe()["rows_sha256"] != train.describe()["rows_sha256"]


def test_holdout_keeps_class_shares(tmp_path):
    for name in ("a", "b", "c"):
        for index in range(10):
            _save(tmp_path / name / f"{index}.png", (index, 0, 0))
    config = DataConfig(source=str(tmp_path), image_size=8, holdout=6, limit=9)
    holdout = open_images(config, "holdout")
    train = open_images(config, "train")
    assert np.bincount(holdout.labels).tolist() == [2, 2, 2]
    assert np.bincount(train.labels).tolist() == [3, 3, 3]
    assert not set(holdout.rows.tolist()) & set(train.rows.tolist())


def test_holdout_too_large(tmp_path):
    _save(tmp_path / "0.png", (0, 0, 0))
    with pytest.raises(FaeError, match="data.holdout = 1 leaves no training images"):
        open_images(DataConfig(source=str(tmp_path), holdout=1))


def test_holdout_split_needs_holdout(tmp_path):
    _save(tmp_path / "0.png", (0, 0, 0))
    with pytest.raises(FaeError, match="no holdout split"):
        open_images(DataConfig(source=str(tmp_path)), "holdout")


def test_empty_folder_names_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FaeError, match=f"no image files in {tmp_path}"):
        open_images(DataConfig(source=str(tmp_path)))


def test_missing_source(tmp_path):
    with pytest.raises(FaeError, match="not found"):
        open_images(DataConfig(source=str(tmp_path / "nothing")))


def test_unknown_split(tmp_path):
    with pytest.raises(FaeError, match="invalid split 'val'"):
        open_images(DataConfig(), "val")


def test_unreadable_file_read_and_getitem(tmp_path):
    _save(tmp_path / "good.png", (9, 9, 9))
    (tmp_path / "bad.jpg").write_text("not pixels")
    dataset = open_images(DataConfig(source=str(tmp_path), image_size=8))
    image, label, reason = dataset.read(0)
    assert image is None
    assert reason == "not an image"
    with pytest.raises(FaeError, match="unreadable image bad.jpg"):
        dataset[0]
    assert dataset.skipped.entries == [("bad.jpg", "not an image")]
    assert dataset.read(1)[0] is not None


def test_npz_adm_keys(tmp_path):
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[:, :, :, 0] = np.arange(4)[:, None, None] * 10
    np.savez(tmp_path / "set.npz", arr_0=images, arr_1=np.array([2, 0, 1, 2]))
    dataset = open_images(DataConfig(source=str(tmp_path / "set.npz"), image_size=8, holdout=1))
    assert len(dataset) == 3
    assert dataset.num_classes == 3
    assert dataset.labels.tolist() == [2, 0, 2]  # row 2, the middle of 4, is the holdout
    assert dataset[1][0][0].unique().tolist() == [10]
    assert dataset[2][0][0].unique().tolist() == [30]


def test_npz_grey_unlabelled(tmp_path):
    np.savez(tmp_path / "grey.npz", images=np.full((2, 9, 9), 33, dtype=np.uint8))
    dataset = open_images(DataConfig(source=str(tmp_path / "grey.npz"), image_size=8))
    image, label = dataset[0]
    assert label == -1
    assert (image == 33).all()


def test_npz_rejects_float(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 5, 5, 3), dtype=np.float32))
    with pytest.raises(FaeError, match="expected uint8"):
        open_images(DataConfig(source=str(tmp_path / "f.npz")))


def test_npz_without_images(tmp_path):
    np.savez(tmp_path / "e.npz", other=np.zeros(3))
    with pytest.raises(FaeError, match="no image array"):
        open_images(DataConfig(source=str(tmp_path / "e.npz")))


def test_fashion_mnist_train_balanced():
    dataset = open_images(DataConfig(image_size=28))
    assert len(dataset) == 6000
    assert np.bincount(dataset.labels).tolist() == [600] * 10
    assert dataset.class_names[0] == "T-shirt/top"
    assert dataset.class_names[9] == "Ankle boot"


def test_fashion_mnist_holdout_is_test_split():
    dataset = open_images(DataConfig(image_size=32, limit=10, holdout=3), "holdout")
    assert len(dataset) == 1000
    assert np.bincount(dataset.labels).tolist() == [100] * 10
    assert dataset.describe()["layout"] == "fashion-mnist-test"


def test_fashion_mnist_item_and_limit():
    full = open_images(DataConfig(image_size=32))
    dataset = open_images(DataConfig(image_size=32, limit=5))
    image, label = dataset[0]
    assert len(dataset) == 5
    assert dataset.rows.tolist() == [600, 1800, 3000, 4200, 5400]
    assert dataset.labels.tolist() == full.labels[[600, 1800, 3000, 4200, 5400]].tolist()
    assert tuple(image.shape) == (3, 32, 32)
    assert (image[0] == image[1]).all()
    assert torch.equal(image, full[600][0])
    assert label == full[600][1]


def test_describe_facts(class_folder):
    facts = open_images(DataConfig(source=str(class_folder), image_size=8)).describe()
    assert facts["layout"] == "class-folders"
    assert facts["count"] == 4
    assert facts["class_names"] == ["n01", "n02"]
    assert facts["preprocessing"] == "adm-center-crop"
