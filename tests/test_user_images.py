"""Images as users have them: phone photos with an EXIF orientation, transparent PNGs, 16-bit and palette PNGs,
CMYK JPEGs and files cut short, read by training and by the runtime as a photo viewer shows them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.data import (ModelInputs, eval_transform, load_data, make_loader, recall_unreadable, skipped_images,
                         unreadable_marks)
from edgekd.deploy.bundle import preprocess_json
from edgekd.errors import EdgekdError
from edgekd.record import data_fingerprint
from edgekd.runtime import BundleError, ImagePreprocessor, as_model_pixels, read_image
from edgekd.types import DataSpec, Preprocess
from tests.helpers.images import write_images
from tests.helpers.user_images import UserImage, write_truncated_jpeg, write_user_images

KINDS = ("exif", "rgba", "grey16", "palette", "palette_transparent", "cmyk")


@pytest.fixture(scope="module")
def user_images(tmp_path_factory) -> dict[str, UserImage]:
    return write_user_images(tmp_path_factory.mktemp("user-images"))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_reads_as_a_viewer_shows_it(user_images, kind):
    image = user_images[kind]
    read = np.asarray(as_model_pixels(read_image(image.path), "L" if image.shown.ndim == 2 else "RGB"))
    assert read.shape == image.shown.shape  # e.g. the phone photo comes out landscape, as it was taken
    difference = np.abs(read.astype(np.float64) - image.shown).mean()
    assert difference <= image.tolerance, f"{kind}: mean difference {difference:.2f} levels"


def test_plain_pillow_conversion_would_get_them_wrong(user_images):
    """What the steps above are for: without them the pictures differ from what the user sees."""
    sideways = Image.open(user_images["exif"].path).convert("RGB")
    assert sideways.size[::-1] == Image.fromarray(user_images["exif"].shown).size
    clipped = np.asarray(Image.open(user_images["grey16"].path).convert("L"))
    assert (clipped == 255).mean() > 0.9  # Pillow clips 16-bit values instead of scaling them
    hidden = np.asarray(Image.open(user_images["rgba"].path).convert("RGB"))
    assert (hidden[:, :5] == (0, 255, 0)).all()  # the colour under the transparent pixels


@pytest.mark.parametrize("pre", [
    Preprocess((3, 48, 48), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875),
    Preprocess((1, 40, 40), (0.5,), (0.5,), "bilinear", 1.0),
])
def test_training_and_the_runtime_see_the_same_pixels(user_images, tmp_path, pre):
    for index, image in enumerate(user_images.values()):
        target = tmp_path / "data" / ("a" if index % 2 else "b") / image.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.path, target)
    data = load_data(DataSpec(str(tmp_path / "data"), val_fraction=0.3))
    runtime, training = ImagePreprocessor(preprocess_json(pre, ())), eval_transform(pre)
    for records in (data.train, data.val):
        for index, path in enumerate(records.paths):
            np.testing.assert_allclose(training(records[index][0]).numpy(), runtime(path), atol=1e-6,
                                       err_msg=str(path))


def test_a_file_cut_short_is_skipped_and_counted_without_stopping_the_epoch(user_images, tmp_path):
    for label in ("a", "b"):
        for image in user_images.values():
            target = tmp_path / "data" / label / image.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image.path, target)
    broken = write_truncated_jpeg(tmp_path / "data" / "a" / "interrupted_download.jpg")
    data = load_data(DataSpec(str(tmp_path / "data"), val_fraction=0.3))
    assert data.info.skipped_corrupt == 0  # its header is fine: only decoding finds the damage
    pre = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    seen = 0
    for records in (data.train, data.val):  # worker processes decode, as in training
        loader = make_loader(ModelInputs(records, [pre], training=True), 4, shuffle=True, num_workers=2)
        seen += sum(len(labels) for _, labels in loader)
    assert seen == data.info.num_train + data.info.num_val  # a readable image took the broken one's place
    assert skipped_images(data) == 1
    # a later process that reuses this one's work recalls what it found (compress keeps it in unreadable.json)
    again = load_data(DataSpec(str(tmp_path / "data"), val_fraction=0.3))
    assert skipped_images(again) == 0
    recall_unreadable(again, json.loads(json.dumps(unreadable_marks(data))))
    assert skipped_images(again) == 1
    split = "train" if broken in again.train.paths else "val"
    records = getattr(again, split)
    assert records.bad[records.paths.index(broken)]  # skipped without being read again
    with pytest.raises(BundleError, match="cannot read image .*interrupted_download.jpg.*truncated"):
        read_image(broken)


def test_evaluation_leaves_an_undecodable_image_out_instead_of_counting_another_twice(user_images, tmp_path, caplog):
    """Training takes the next readable image in a broken one's place; evaluation must not: the validation figures
    (the teacher's, the student's, the int8 guard's, bench's) are over the readable images, each counted once."""
    import torch

    from edgekd.data import readable_count
    from edgekd.deploy.verify import preprocess_records
    from edgekd.distill.train_utils import Compute, evaluate

    for split in ("train", "val"):
        for label in ("a", "b"):
            for image in user_images.values():
                target = tmp_path / "data" / split / label / image.path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image.path, target)
    broken = write_truncated_jpeg(tmp_path / "data" / "val" / "a" / "interrupted_download.jpg")
    data = load_data(DataSpec(str(tmp_path / "data")))
    pre = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)).eval()
    loader = make_loader(ModelInputs(data.val, [pre], training=False), 4, shuffle=False, num_workers=2)
    measured = evaluate(model, loader, Compute.choose(torch.device("cpu"), "fp32"))
    readable = [i for i, path in enumerate(data.val.paths) if path != broken]
    assert measured.count == len(readable) == len(data.val) - 1 == readable_count(data.val)
    transform = eval_transform(pre)
    with torch.inference_mode():
        predicted = [int(model(transform(data.val[i][0])[None]).argmax()) for i in readable]
    assert measured.top1 == pytest.approx(np.mean(np.array(predicted) == data.val.labels[readable]))
    assert measured.predictions.tolist() == predicted
    evalset = preprocess_records(data.val, pre)  # the ONNX side (guard, bench) likewise, in shuffled order
    assert sorted(evalset.indices.tolist()) == readable and "1 undecodable left out" in evalset.method
    assert evalset.labels.tolist() == data.val.labels[evalset.indices].tolist()
    # distillation's fixed views use the eval transform, but train: the next image, never a black placeholder
    training = ModelInputs(data.val, [pre], training=False, evaluation=False)
    assert all(training[i][-1] >= 0 for i in range(len(data.val)))
    # a later run that recalls the broken file names it in its own log
    again = load_data(DataSpec(str(tmp_path / "data")))
    with caplog.at_level("WARNING", logger="edgekd"):
        recall_unreadable(again, unreadable_marks(data))
    assert "interrupted_download.jpg" in caplog.text and "earlier run" in caplog.text


def write_tar(path, members: dict[str, Path]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, source in members.items():
            archive.add(source, arcname=name)


def test_a_tar_of_class_folders_is_read_in_place(user_images, tmp_path):
    """An archive as users download data sets: class folders inside one .tar, read by timm's tar reader without
    unpacking; every kind of file comes out as a viewer shows it, a member cut short is skipped and counted, what
    macOS tar and zip add (AppleDouble `._x.jpg` beside each file, `__MACOSX/`) is not read, and a changed archive
    is a changed data set for the run record."""
    broken = write_truncated_jpeg(tmp_path / "interrupted.jpg")
    members = {f"{label}/{kind}{image.path.suffix}": image.path
               for label in ("a", "b") for kind, image in user_images.items()}
    apple_double = tmp_path / "apple_double"
    apple_double.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    archivers = {"a/._photo.jpg": apple_double, "b/._photo.jpg": apple_double, "__MACOSX/a/._photo.jpg": apple_double,
                 "__MACOSX/c/._photo.jpg": apple_double, "._cover.jpg": apple_double}  # timm's class "" comes first
    write_tar(tmp_path / "shop.tar", {**members, "a/interrupted.jpg": broken, **archivers})
    data = load_data(DataSpec(str(tmp_path / "shop.tar"), val_fraction=0.3))
    assert data.info.class_names == ("a", "b") and data.info.num_train + data.info.num_val == 13
    shown = {}
    for records in (data.train, data.val):
        for index in range(len(records)):
            name = records.name(index).rsplit(":", 1)[1]
            assert data.info.class_names[records.labels[index]] == name.split("/")[0], name
            if "interrupted" not in name:
                shown[name] = np.asarray(records[index][0])
    for name, source in members.items():
        kind = Path(name).stem
        expected = np.asarray(as_model_pixels(read_image(source), "L" if user_images[kind].shown.ndim == 2 else "RGB"))
        np.testing.assert_array_equal(shown[name], expected, err_msg=name)
    pre = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    for records in (data.train, data.val):  # worker processes, each opening the archive itself
        loader = make_loader(ModelInputs(records, [pre], training=True), 4, shuffle=True, num_workers=2)
        assert sum(len(labels) for _, labels in loader) == len(records)
    assert skipped_images(data) == 1

    before = data_fingerprint(data)
    write_tar(tmp_path / "shop.tar", members)  # the user drops the broken file and packs again
    assert data_fingerprint(load_data(DataSpec(str(tmp_path / "shop.tar"), val_fraction=0.3))) != before


def test_train_teacher_on_a_tar(tmp_path, small_fmnist):
    """The README's command with --data pointing at a .tar, end to end."""
    labels = small_fmnist.train.labels
    keep = [i for c in range(3) for i in np.flatnonzero(labels == c)[:16]]
    write_images(tmp_path / "images", small_fmnist.train.images[keep], labels[keep], ("shirt", "trouser", "bag"))
    write_tar(tmp_path / "shop.tar", {p.relative_to(tmp_path / "images").as_posix(): p
                                      for p in sorted((tmp_path / "images").rglob("*.png"))})
    result = CliRunner().invoke(app, ["train-teacher", "--teacher", "test_resnet", "--random-init", "--data",
                                      str(tmp_path / "shop.tar"), "--input-size", "32", "--epochs", "1",
                                      "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "teacher")])
    assert result.exit_code == 0, result.output
    teacher = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert teacher["class_names"] == ["bag", "shirt", "trouser"] and teacher["val_top1"] is not None


def test_a_file_that_is_not_a_tar_says_so(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"this is not an archive" * 50)
    result = CliRunner().invoke(app, ["train-teacher", "--teacher", "test_resnet", "--random-init", "--data",
                                      str(tmp_path / "fake.tar"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "as a tar archive" in result.output and "Traceback" not in result.output


def write_shards(folder: Path, images: np.ndarray, labels: np.ndarray, per_shard: int) -> None:
    """WebDataset shards as its TarWriter writes them: KEY.png with KEY.cls (the class index as text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), per_shard):
        with tarfile.open(folder / f"shard-{start // per_shard:06d}.tar", "w") as shard:
            for index in range(start, min(start + per_shard, len(images))):
                for extension, payload in (("png", _png(images[index])), ("cls", str(int(labels[index])).encode())):
                    info = tarfile.TarInfo(f"sample{index:06d}.{extension}")
                    info.size = len(payload)
                    shard.addfile(info, io.BytesIO(payload))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_shards_are_read_in_place(tmp_path, small_fmnist):
    images, labels = small_fmnist.train.images[:60], small_fmnist.train.labels[:60]
    write_shards(tmp_path / "shards", images, labels, per_shard=25)  # 3 shards
    data = load_data(DataSpec(str(tmp_path / "shards"), val_fraction=0.2))
    assert data.info.labeled and data.info.num_train + data.info.num_val == 60
    assert data.info.class_names == tuple(str(c) for c in range(int(labels.max()) + 1))
    for records in (data.train, data.val):
        for index in range(len(records)):
            sample = int(records.name(index).rsplit("sample", 1)[1][:6])
            image, label = records[index]
            assert label == labels[sample]
            np.testing.assert_array_equal(np.asarray(image), images[sample])
    pre = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    loader = make_loader(ModelInputs(data.train, [pre], training=True), 8, shuffle=True, num_workers=2)
    assert sum(len(batch_labels) for _, batch_labels in loader) == data.info.num_train

    result = CliRunner().invoke(app, ["train-teacher", "--teacher", "test_resnet", "--random-init", "--data",
                                      str(tmp_path / "shards"), "--input-size", "32", "--epochs", "1",
                                      "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "teacher")])
    assert result.exit_code == 0, result.output

    write_shards(tmp_path / "half", images[:10], labels[:10], per_shard=10)
    with tarfile.open(tmp_path / "half" / "shard-000000.tar", "a") as shard:
        info = tarfile.TarInfo("sample999999.png")
        payload = _png(images[0])
        info.size = len(payload)
        shard.addfile(info, io.BytesIO(payload))
    with pytest.raises(EdgekdError, match="sample999999.png has no .*sample999999.cls"):
        load_data(DataSpec(str(tmp_path / "half")))
    write_shards(tmp_path / "mac", images[:10], labels[:10], per_shard=10)
    with tarfile.open(tmp_path / "mac" / "shard-000000.tar", "a") as shard:  # macOS tar's AppleDouble member
        info = tarfile.TarInfo("._sample000003.png")
        info.size = 4096
        shard.addfile(info, io.BytesIO(bytes(4096)))
    mac = load_data(DataSpec(str(tmp_path / "mac")))
    assert mac.info.num_train + mac.info.num_val == 10


def test_a_folder_of_one_tar_per_class(tmp_path, small_fmnist):
    """timm's other tar layout: a .tar per class, named after it."""
    labels = small_fmnist.train.labels
    for name, label in (("shirt", 0), ("trouser", 1)):
        members = {}
        for index in np.flatnonzero(labels == label)[:8]:
            members[f"{index}.png"] = tmp_path / f"{index}.png"
            Image.fromarray(small_fmnist.train.images[index]).save(members[f"{index}.png"])
        (tmp_path / "classes").mkdir(exist_ok=True)
        write_tar(tmp_path / "classes" / f"{name}.tar", members)
        # what macOS puts beside each file it copies: an AppleDouble `._shirt.tar`, not an archive
        (tmp_path / "classes" / f"._{name}.tar").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
    (tmp_path / "classes" / ".git").mkdir()  # nor is a dot-folder beside them a class folder
    (tmp_path / "classes" / "._cover.jpg").write_bytes(bytes(4096))
    data = load_data(DataSpec(str(tmp_path / "classes"), val_fraction=0.25))
    assert data.info.class_names == ("shirt", "trouser") and data.info.num_train + data.info.num_val == 16
    assert sorted(set(data.train.labels.tolist())) == [0, 1] and data.train[0][0].size == (28, 28)
