import tarfile

import pytest
import torch

from l2o_kd.data import BatchLoader, load_dataset, load_splits, make_synthetic, random_crop_flip, split_train_val
from l2o_kd.errors import UserError


def test_split_is_stratified_disjoint_and_fixed():
    ds = make_synthetic(n_train=1000)
    a, b = split_train_val(ds), split_train_val(ds)
    assert len(a.train_y) + len(a.val_y) == 1000 and abs(len(a.val_y) - 100) <= 10
    assert torch.equal(a.val_x, b.val_x)
    # disjoint and complete, checked on the images themselves (the synthetic ones are all distinct)
    rows = lambda x: {bytes(img.numpy().tobytes()) for img in x}
    train_imgs, val_imgs, all_imgs = rows(a.train_x), rows(a.val_x), rows(ds.train_x)
    assert len(all_imgs) == 1000 and not train_imgs & val_imgs and train_imgs | val_imgs == all_imgs
    for c in range(10):
        n_c = (ds.train_y == c).sum()
        assert (a.val_y == c).sum() == round(int(n_c) * 0.1)


def test_loader_covers_every_image_once_and_order_depends_on_seed_and_epoch():
    x = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 32, 32).to(torch.uint8)
    y = torch.arange(10)
    loader = BatchLoader(x, y, 4, mean=(0, 0, 0), std=(1 / 255,) * 3)
    seen = torch.cat([b.y for b in loader.epoch(0, seed=1)])
    assert sorted(seen.tolist()) == list(range(10)) and len(loader) == 3
    assert torch.equal(seen, torch.cat([b.y for b in loader.epoch(0, seed=1)]))
    assert not torch.equal(seen, torch.cat([b.y for b in loader.epoch(1, seed=1)]))
    b = next(loader.epoch(0, seed=1))
    assert torch.equal(b.x[:, 0, 0, 0], b.y.float())  # normalization (x - 0) / 1 keeps values; idx matches labels
    assert torch.equal(b.idx, b.y)


def test_crop_flip_moves_whole_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    same = random_crop_flip(x, g, pad=0)
    flipped = torch.tensor([torch.equal(same[i], x[i].flip(-1)) for i in range(64)])
    assert all(torch.equal(same[i], x[i]) for i in range(64) if not flipped[i])
    assert 10 < int(flipped.sum()) < 54  # about half the batch is flipped
    out = random_crop_flip(x, g)
    assert out.shape == x.shape
    # every output image is a translated (possibly flipped) window of its padded input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere")):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("mnist")


def test_malformed_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="cannot read archive"):
        load_dataset("cifar10", bad)
    few = tmp_path / "few.tar.gz"
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    with tarfile.open(few, "w:gz") as tar:
        tar.add(img, arcname="c/train/cat/0.png")
        tar.add(img, arcname="c/test/cat/0.png")
    with pytest.raises(UserError, match="10 class folders"):
        load_dataset("cifar10", few)


@pytest.mark.real_data
def test_real_cifar_copy(real_cifar):
    splits = load_splits("cifar10", real_cifar)
    ds = splits.dataset
    assert ds.train_x.shape == (50_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8
    assert torch.equal(ds.train_y.bincount(), torch.full((10,), 5000))
    assert torch.equal(ds.test_y.bincount(), torch.full((10,), 1000))
    assert len(splits.train_y) == 45_000 and len(splits.val_y) == 5_000
    assert torch.equal(splits.val_y.bincount(), torch.full((10,), 500))
    # mean pixel per channel close to the published CIFAR-10 statistics
    mean = ds.train_x[::10].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(ds.mean), atol=0.01)


def test_batch_at_reproduces_the_stream():
    ds = make_synthetic(n_train=100)
    loader = BatchLoader(ds.train_x, ds.train_y, 16, mean=ds.mean, std=ds.std, drop_last=True)
    stream = [b for e in range(3) for b in loader.epoch(e, seed=5)]
    for i in (0, 5, 6, 13, 17):
        assert torch.equal(loader.batch_at(i, seed=5).idx, stream[i].idx)
