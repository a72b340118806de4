"""Data sources behind --data, on real Fashion-MNIST images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.data import (FASHION_MNIST_CLASSES, ModelInputs, eval_transform, load_data, skipped_images,
                         stratified_split)
from edgekd.errors import EdgekdError
from edgekd.types import DataSpec, Preprocess
from tests.helpers.images import write_images


def test_fashion_mnist_is_the_real_dataset(fmnist_root: Path):
    loaded = load_data(DataSpec("fashion-mnist"))
    assert (loaded.info.num_train, loaded.info.num_val) == (60000, 10000)
    assert loaded.info.class_names == FASHION_MNIST_CLASSES and loaded.info.labeled
    assert np.bincount(loaded.val.labels).tolist() == [1000] * 10
    image, label = loaded.train[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 10


def test_fashion_mnist_missing_root_says_how_to_install(tmp_path: Path):
    with pytest.raises(EdgekdError, match="apt-get install dataset-fashion-mnist"):
        load_data(DataSpec("fashion-mnist", fashion_mnist_root=tmp_path))


def test_subsets_are_stratified_and_seeded(fmnist_root: Path):
    first = load_data(DataSpec("fashion-mnist", max_train=500, max_val=200, seed=3))
    again = load_data(DataSpec("fashion-mnist", max_train=500, max_val=200, seed=3))
    assert first.info.num_train == 500 and first.info.num_val == 200
    assert np.array_equal(first.train.images, again.train.images)
    assert np.bincount(first.train.labels).tolist() == [50] * 10


def test_class_folder_without_split_is_split_per_class(class_folder: Path):
    loaded = load_data(DataSpec(str(class_folder), val_fraction=0.25, seed=1))
    assert loaded.info.class_names == ("pullover", "trouser", "tshirt") and loaded.info.labeled
    assert loaded.info.num_val == 9 and loaded.info.num_train == 27
    assert np.bincount(loaded.val.labels).tolist() == [3, 3, 3]
    assert set(loaded.train.paths).isdisjoint(loaded.val.paths)
    assert load_data(DataSpec(str(class_folder), val_fraction=0.25, seed=1)).val.paths == loaded.val.paths


def test_bench_reads_a_runs_validation_split_as_the_run_recorded_it(class_folder: Path, tmp_path: Path,
                                                                    fmnist_arrays):
    """`edgekd bench RUN` rebuilds the run's data from run.json: a non-default --val-fraction must give the same
    validation images the run held out (with 0.2 instead, a third of them would be training images)."""
    import json

    from edgekd.cli.bench import _runs_data
    from edgekd.pipeline import RUN_NAME, _jsonable

    write_images(tmp_path / "extra", fmnist_arrays[0][:6], None, suffix=".jpg")
    spec = DataSpec(str(class_folder), val_fraction=0.5, seed=3, unlabeled=(str(tmp_path / "extra"),))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_NAME).write_text(json.dumps({"config": {"data": _jsonable(spec)}}))
    recalled = _runs_data([run_dir])
    assert recalled is not None and recalled.unlabeled == ()  # accuracy needs no unlabeled folder indexed
    assert load_data(recalled).val.paths == load_data(spec).val.paths
    assert load_data(recalled).info.num_val == 18


def test_train_and_val_folders_are_used_as_given(tmp_path: Path, fmnist_arrays):
    images, labels = fmnist_arrays
    names = ("a", "b", "c")
    write_images(tmp_path / "train", images[::2], labels[::2], names)
    write_images(tmp_path / "val", images[1::2], labels[1::2], names)
    loaded = load_data(DataSpec(str(tmp_path)))
    assert (loaded.info.num_train, loaded.info.num_val) == (18, 18)
    image, label = loaded.val[0]
    assert image.size == (28, 28) and label in (0, 1, 2)


def test_unlabeled_folder_gives_label_minus_one(tmp_path: Path, fmnist_arrays):
    images, _ = fmnist_arrays
    write_images(tmp_path / "loose", images[:10], None, suffix=".jpg")
    loaded = load_data(DataSpec(str(tmp_path / "loose"), val_fraction=0.2))
    assert not loaded.info.labeled and loaded.info.class_names == ()
    assert loaded.info.num_train + loaded.info.num_val == 10
    assert set(loaded.train.labels.tolist()) == {-1}


def test_folders_as_exports_and_archivers_leave_them(tmp_path: Path, fmnist_arrays, caplog):
    """What users' folders hold besides the pictures, each read as they mean it (the layouts of a fourth trial)."""
    import unicodedata

    images, labels = fmnist_arrays
    names = ("shirt", "Größe", "coat")
    # Roboflow / YOLO exports: train/, valid/ and test/; validation on valid/, not on test/, and not 2 classes
    for split, part in (("train", slice(0, None, 2)), ("valid", slice(1, None, 4)), ("test", slice(3, None, 4))):
        write_images(tmp_path / "export" / split, images[part], labels[part], names)
    with caplog.at_level("INFO"):
        loaded = load_data(DataSpec(str(tmp_path / "export")))
    assert loaded.info.class_names == tuple(sorted(names)) and loaded.info.num_val == 9
    assert all("/valid/" in str(path) for path in loaded.val.paths) and "test/ not used" in caplog.text

    # the same class name written in another Unicode form in valid/ (macOS, some zip tools) is the same class
    nfd = tmp_path / "export" / "valid" / unicodedata.normalize("NFD", "Größe")
    (tmp_path / "export" / "valid" / "Größe").rename(nfd)
    again = load_data(DataSpec(str(tmp_path / "export")))
    assert [again.info.class_names[label] for label in again.val.labels] == \
        [loaded.info.class_names[label] for label in loaded.val.labels]

    # train/ alone would have been one class named "train"
    shutil.rmtree(tmp_path / "export" / "valid")
    shutil.rmtree(tmp_path / "export" / "test")
    with pytest.raises(EdgekdError, match="holds train/ with class folders inside but not a validation folder"):
        load_data(DataSpec(str(tmp_path / "export")))

    # a macOS zip's __MACOSX/ (AppleDouble `._` files, not images) is no class, nor are `._` files images
    shop = tmp_path / "shop"
    write_images(shop, images, labels, names)
    for name in names:
        for junk in (shop / "__MACOSX" / name / "._img_0000.png", shop / name / "._img_0001.png"):
            junk.parent.mkdir(parents=True, exist_ok=True)
            junk.write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
    # a linked folder back up (`up -> ..`) reads each real folder once
    (shop / "shirt" / "up").symlink_to("..")
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(shop)))
    assert loaded.info.class_names == tuple(sorted(names)) and loaded.info.skipped_corrupt == 0
    assert len(loaded.train) + len(loaded.val) == len(images) and "not following 1 linked folder" in caplog.text

    # a class folder whose files are none of them images is an error, as an empty one is
    fake = shop / "fake"
    fake.mkdir()
    (fake / "photo.jpg").write_text("not a picture")
    with pytest.raises(EdgekdError, match="fake holds no readable images"):
        load_data(DataSpec(str(shop)))
    # a class with one image is trained on but never measured: said, naming it
    shutil.copyfile(shop / "coat" / sorted(os.listdir(shop / "coat"))[-1], fake / "photo.jpg")
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(shop)))
    assert "no validation image for 1 class(es) (fake)" in caplog.text


def test_split_and_class_names_are_told_apart(tmp_path: Path, fmnist_arrays, caplog):
    """The layouts the split detection must not mistake: a class called "train" (a vehicle) beside other classes,
    capitalised split folders, a link to another class, and two folders that are one name in two Unicode forms."""
    import unicodedata

    images, labels = fmnist_arrays
    vehicles = tmp_path / "vehicles"
    write_images(vehicles, images, labels, ("bus", "car", "train"))
    (vehicles / "train" / "2024").mkdir()
    shutil.move(str(vehicles / "train" / "img_0024.png"), vehicles / "train" / "2024")
    loaded = load_data(DataSpec(str(vehicles)))
    assert loaded.info.class_names == ("bus", "car", "train") and len(loaded.train) + len(loaded.val) == 36

    capitals = tmp_path / "capitals"
    write_images(capitals / "Train", images[::2], labels[::2], ("a", "b", "c"))
    write_images(capitals / "Val", images[1::2], labels[1::2], ("a", "b", "c"))
    loaded = load_data(DataSpec(str(capitals)))
    assert (loaded.info.num_train, loaded.info.num_val, loaded.info.class_names) == (18, 18, ("a", "b", "c"))

    # a link from one class to another's folder would label its images twice: not followed
    (vehicles / "bus" / "more").symlink_to(vehicles / "car")
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(vehicles)))
    assert len(loaded.train) + len(loaded.val) == 36 and "to another class" in caplog.text
    (vehicles / "bus" / "more").unlink()

    (vehicles / unicodedata.normalize("NFD", "café")).mkdir()
    (vehicles / unicodedata.normalize("NFC", "café")).mkdir()
    for form in ("NFD", "NFC"):
        shutil.copyfile(vehicles / "bus" / "img_0000.png", vehicles / unicodedata.normalize(form, "café") / "x.png")
    with pytest.raises(EdgekdError, match="differ only in how their accents are encoded"):
        load_data(DataSpec(str(vehicles)))


def test_a_copy_is_the_same_bytes_not_the_same_header(tmp_path: Path, fmnist_arrays):
    """Uncompressed pictures of one shape share their size and their first bytes: only the whole file tells a copy."""
    from PIL import Image

    from edgekd.data import _copies_of

    picture = np.zeros((700, 700), np.uint8)
    Image.fromarray(picture).save(tmp_path / "original.bmp")  # 490 kB; BMP stores the bottom row first
    picture[:5] = 255  # the top rows: the file's last bytes
    Image.fromarray(picture).save(tmp_path / "other.bmp")
    shutil.copyfile(tmp_path / "original.bmp", tmp_path / "copy.bmp")
    (tmp_path / "gone.bmp").symlink_to(tmp_path / "nowhere.bmp")
    candidates = [tmp_path / "other.bmp", tmp_path / "copy.bmp", tmp_path / "gone.bmp"]
    assert (tmp_path / "other.bmp").stat().st_size == (tmp_path / "original.bmp").stat().st_size
    assert _copies_of(candidates, [tmp_path / "original.bmp"]) == {1}


def test_corrupt_images_are_skipped_and_counted(class_folder: Path, caplog):
    (class_folder / "tshirt" / "broken.png").write_bytes(b"not an image at all")
    (class_folder / "tshirt" / "empty.png").write_bytes(b"")
    (class_folder / "trouser" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    loose = class_folder / "tshirt" / "img_0000.png"
    (class_folder / "beside_the_classes.png").write_bytes(loose.read_bytes())
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(class_folder)))
    assert loaded.info.skipped_corrupt == 2  # not images at all: left out when the folder is read, each named
    assert "broken.png" in caplog.text and "empty.png" in caplog.text
    # an image beside the class folders has no label: left out, and said
    assert "ignored 1 image(s) directly in" in caplog.text and "beside_the_classes.png" in caplog.text
    assert loaded.info.num_train + loaded.info.num_val == 37
    for records in (loaded.train, loaded.val):  # a JPEG header with nothing after it: found when decoded
        assert all(records[i][0].size == (28, 28) for i in range(len(records)))
    assert skipped_images(loaded) == 3


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "is not a folder"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "no images found"),
    (lambda root: (root / "c" / "cat").mkdir(parents=True) or root / "c", "class folder .* has no images"),
])
def test_bad_data_folders_get_clear_errors(tmp_path: Path, make, message):
    with pytest.raises(EdgekdError, match=message):
        load_data(DataSpec(str(make(tmp_path))))


def test_stratified_split_keeps_every_class_on_both_sides():
    train, val = stratified_split(np.array([0] * 10 + [1] * 2 + [2] * 5), 0.2, seed=0)
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    assert set(labels[val]) == {0, 1, 2} and set(labels[train]) == {0, 1, 2}


def test_each_model_gets_its_own_preprocessing(small_fmnist):
    rgb = Preprocess((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.9)
    gray = Preprocess((1, 24, 24), (0.5,), (0.5,), "bilinear", 1.0)
    x_rgb, x_gray, label = ModelInputs(small_fmnist.val, [rgb, gray], training=False)[0]
    assert x_rgb.shape == (3, 32, 32) and x_gray.shape == (1, 24, 24)
    assert torch.allclose(x_rgb[0] * 0.229 + 0.485, x_rgb[1] * 0.224 + 0.456, atol=1e-5)  # gray fed to RGB
    assert torch.allclose(x_gray, eval_transform(gray)(small_fmnist.val[0][0]))
    assert label == int(small_fmnist.val.labels[0])


def test_training_views_are_shared_between_models(small_fmnist):
    """Teacher and student must see the same random crop, or distillation compares different images."""
    pre = Preprocess((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    other = Preprocess((3, 32, 32), (0.2,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    x_a, x_b, _ = ModelInputs(small_fmnist.train, [pre, other], training=True)[5]
    assert torch.allclose(x_a * 0.5 + 0.5, x_b * 0.25 + 0.2, atol=1e-5)


def test_unlabeled_images_are_taken_once_and_never_the_labeled_ones(class_folder: Path, tmp_path: Path, caplog):
    """Overlapping --unlabeled-data folders count each file once, and an image of --data (a validation image above
    all: the guard and the report measure on those) is not trained on again without its label."""
    write_images(tmp_path / "extra" / "nested", np.full((6, 28, 28), 100, np.uint8), None)
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(class_folder), unlabeled=(str(tmp_path / "extra"), str(tmp_path / "extra" /
                                                                                                 "nested"),
                                                                 str(class_folder))))
    labeled = {p.resolve() for records in (loaded.train, loaded.val) for p in records.paths}
    assert loaded.info.num_unlabeled == 6 and len(set(loaded.unlabeled.paths)) == 6
    assert not labeled & {p.resolve() for p in loaded.unlabeled.paths}
    assert "given more than once" in caplog.text and "also in --data" in caplog.text
    with pytest.raises(EdgekdError, match="only images that are in --data"):
        load_data(DataSpec(str(class_folder), unlabeled=(str(class_folder / "tshirt"),)))

    # copies are how overlap usually comes (an "all photos" folder): the same bytes under another path are left out
    photos = tmp_path / "all_photos"
    photos.mkdir()
    val = load_data(DataSpec(str(class_folder))).val.paths
    for index, path in enumerate(val[:3]):
        shutil.copyfile(path, photos / f"copy_{index}.png")
    same_size = bytearray(val[0].read_bytes())
    same_size[-20] ^= 0xFF  # one byte differs: another picture of the same size, kept
    (photos / "other.png").write_bytes(bytes(same_size))
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded = load_data(DataSpec(str(class_folder), unlabeled=(str(photos),)))
    assert [path.name for path in loaded.unlabeled.paths] == ["other.png"]
    assert "left out 3 image(s) with the same contents as images in --data" in caplog.text
