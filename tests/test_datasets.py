"""CIFAR-100 (generated files in its official format) and image folders through every command; the example script."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o_kd.cli import main
from l2o_kd.data import IMAGE_SIZE, load_splits
from l2o_kd.errors import UserError
from l2o_kd.runlog import read_metrics
from l2o_kd.teacher import load_model_checkpoint, teacher_logits

REPO = Path(__file__).resolve().parent.parent


def _cifar100(root: Path, per_class: int = 10, test_per_class: int = 2) -> Path:
    """A CIFAR-100 of random images in the official python format (cifar-100-python/train, test)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), n)
        rng.shuffle(fine)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        data[:, :1024] = (fine[:, None] * 2).astype(np.uint8)  # the red channel tells the class: a learnable task
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}, f)
    return root


def _image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, size=(40, 36)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c] = 255  # one channel saturated per class
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def test_cifar100_loads_with_100_classes_a_stratified_val_split_and_a_cache(tmp_path):
    root = _cifar100(tmp_path / "data")
    splits = load_splits("cifar100", root)
    ds = splits.dataset
    assert ds.num_classes == 100 and tuple(ds.train_x.shape) == (1000, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert tuple(ds.test_x.shape) == (200, 3, 32, 32) and len(splits.val_y) == 100 and len(splits.train_y) == 900
    assert torch.equal(torch.bincount(splits.val_y, minlength=100), torch.ones(100, dtype=torch.int64))  # 1 of 10 per class
    with open(root / "cifar-100-python" / "train", "rb") as f:  # the images are the file's, in its layout
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(ds.train_x[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))
    assert ds.train_y[0] == raw[b"fine_labels"][0]
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle")  # same size and mtime change: a new decode is tried
    with pytest.raises(UserError, match="cannot read .* as a CIFAR python batch"):
        load_splits("cifar100", root)


def test_cifar100_runs_through_teacher_training_deploy_compare_and_evaluate(tmp_path, capsys):
    root = str(_cifar100(tmp_path / "data"))
    common = ["--dataset", "cifar100", "--data-root", root, "--runs-dir", str(tmp_path), "--no-progress"]
    main(["train-teacher", "--model", "tiny", "--steps", "20", "--batch-size", "64", "--run-name", "t", *common])
    teacher = tmp_path / "t" / "checkpoint.pt"
    model, ck = load_model_checkpoint(teacher)
    assert ck["num_classes"] == 100 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    logits = teacher_logits(model, teacher, load_splits("cifar100", root))
    assert logits["train"].shape == (900, 100) and logits["val"].shape == (100, 100)
    main(["deploy", "--optimizer", "adam", "--student", "tiny", "--teacher", str(teacher), "--steps", "5", "--batch-size", "64",
          "--run-name", "s", *common])
    assert read_metrics(tmp_path / "s")[-1]["step"] == 5
    main(["evaluate", str(tmp_path / "s" / "checkpoint.pt"), "--data-root", root, "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dataset"] == "cifar100"
    with pytest.raises(UserError, match="has 10 classes, the dataset cifar100 100"):  # the shipped CIFAR-10 teacher
        teacher_logits(*load_model_checkpoint(REPO / "checkpoints" / "teacher-resnet20.pt")[:1], REPO / "checkpoints" / "teacher-resnet20.pt",
                       load_splits("cifar100", root))


def test_cifar100_missing_is_one_line_that_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["deploy", "--dataset", "cifar100", "--data-root", str(tmp_path), "--optimizer", "adam", "--beta", "0", "--steps", "1",
              "--runs-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CIFAR-100 found" in err and "--download" in err


def test_an_image_folder_is_resized_cut_into_train_val_test_and_cached(tmp_path):
    root = _image_folder(tmp_path / "pets")
    splits = load_splits("imagefolder", root)
    ds = splits.dataset
    assert ds.num_classes == 3 and ds.train_x.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert len(ds.test_y) == 6 and torch.equal(torch.bincount(ds.test_y), torch.tensor([2, 2, 2]))  # 20 % of each class
    assert len(splits.val_y) == 3 and len(splits.train_y) == 21
    assert all(abs(m - 0.5) < 0.35 for m in ds.mean) and all(s > 0 for s in ds.std)
    assert float(ds.train_x[ds.train_y == 1][:, 1].float().mean()) > 250  # the class's saturated channel: labels match folders
    again = load_splits("imagefolder", root)
    assert torch.equal(again.train_x, splits.train_x) and torch.equal(again.dataset.test_y, ds.test_y)


def test_an_image_folder_with_train_and_test_folders_keeps_them(tmp_path):
    _image_folder(tmp_path / "d" / "train", per_class=6)
    _image_folder(tmp_path / "d" / "test", per_class=2)
    ds = load_splits("imagefolder", tmp_path / "d").dataset
    assert len(ds.train_y) == 18 and len(ds.test_y) == 6


@pytest.mark.parametrize("case,message", [("missing", "not a folder"), ("one-class", "found 1 class folder"),
                                          ("corrupt", "cannot read image"), ("no-root", "needs --data-root")])
def test_a_malformed_image_folder_is_one_clear_error(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "one-class":
        _image_folder(root, classes=("only",))
    elif case == "corrupt":
        _image_folder(root)
        (root / "cat" / "001.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=message):
        load_splits("imagefolder", None if case == "no-root" else root)


def test_the_example_distils_into_a_student_on_a_generated_image_folder(tmp_path):
    root = _image_folder(tmp_path / "pets", per_class=8)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "distil_your_model.py"), "--data", str(root), "--steps", "6",
                          "--teacher-epochs", "1", "--batch-size", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "student train accuracy" in out.stdout and "after 6 steps" in out.stdout
