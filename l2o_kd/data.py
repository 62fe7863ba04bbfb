"""Datasets as cached uint8 tensors, the fixed train/val split, and a tensor-resident batch iterator.

Every dataset ends up as four tensors: ``train_x``/``test_x`` (uint8, N x 3 x 32 x 32) and
``train_y``/``test_y`` (int64). CIFAR-10 is read from one of

* the official ``cifar-10-batches-py`` through ``torchvision.datasets.CIFAR10`` (``download=True``
  fetches it when the machine is online),
* an ImageFolder tree ``train/<class>/*`` + ``test/<class>/*``,
* a ``.tar.gz`` archive holding such a tree (the JPEG copy used where there is no network),

decoded once and cached as a ``.pt`` file of uint8 tensors, so later runs load it in well under a
second. Batches never go through per-image Python: shuffling, normalization, random crop and flip
are applied to whole batches of tensors (as in airbench).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_atomic
from .config import DATASETS
from .errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGE_SIZE = 32  # imagefolder images are resized to this square (the models are CIFAR-sized)
TEST_FRACTION = 0.2  # an imagefolder without train/ and test/ folders gives this share of each class to test
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VAL_FRACTION = 0.1
SPLIT_SEED = 0  # the train/val split is fixed for the project, independent of run seeds


def cache_dir() -> Path:
    """Where decoded datasets and teacher logits are cached (``$L2O_KD_CACHE`` or ``~/.cache/l2o_kd``)."""
    return Path(os.environ.get("L2O_KD_CACHE", Path.home() / ".cache" / "l2o_kd"))


def default_data_root() -> Path:
    """``$L2O_KD_DATA`` if set, else ``<cache>/data``."""
    env = os.environ.get("L2O_KD_DATA")
    return Path(env) if env else cache_dir() / "data"


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8, N x 3 x 32 x 32
    train_y: torch.Tensor  # int64, N
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int = 10


@dataclass
class Splits:
    """The official train set cut 9:1 into train/val (stratified, fixed seed), plus the test set."""

    dataset: Dataset
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @property
    def test_x(self) -> torch.Tensor:
        return self.dataset.test_x

    @property
    def test_y(self) -> torch.Tensor:
        return self.dataset.test_y

    def subset(self, n: int, seed: int = SPLIT_SEED) -> Splits:
        """The same splits with only ``n`` training images (a fixed random subset, in their original order).
        Teacher logits are cached per split content, so a subset gets its own cache entry."""
        if not 0 < n <= len(self.train_y):
            raise UserError(f"--train-subset must lie in [1, {len(self.train_y)}], got {n}")
        keep = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return Splits(self.dataset, self.train_x[keep], self.train_y[keep], self.val_x, self.val_y)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split {name!r}: use train, val or test")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


# ----------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    if name == "cifar10":
        return load_cifar10(Path(root) if root else default_data_root(), download)
    if name == "cifar100":
        return load_cifar100(Path(root) if root else default_data_root(), download)
    if name == "imagefolder":
        if root is None:
            raise UserError("--dataset imagefolder needs --data-root DIR: a folder of class folders (or train/ and test/ of them)")
        return load_imagefolder(Path(root))
    if name == "synthetic":
        return make_synthetic()
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")


def load_splits(name: str, root: str | Path | None = None, download: bool = False) -> Splits:
    return split_train_val(load_dataset(name, root, download))


def split_train_val(ds: Dataset, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> Splits:
    """A stratified split: each class gives ``val_fraction`` of its images to val."""
    g = torch.Generator().manual_seed(seed)
    val_parts, train_parts = [], []
    for c in range(ds.num_classes):
        idx = torch.nonzero(ds.train_y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    tr = torch.cat(train_parts).sort().values
    va = torch.cat(val_parts).sort().values
    return Splits(ds, ds.train_x[tr], ds.train_y[tr], ds.train_x[va], ds.train_y[va])


def load_cifar10(root: Path, download: bool = False) -> Dataset:
    source = _find_cifar10_source(root, download)
    cache = _cache_path_for(source)
    if cache.exists():
        arrays = torch.load(cache, weights_only=True)
    else:
        arrays = _decode_source(source, download)
        _check_cifar10(arrays, source)
        save_atomic(arrays, cache)
    return Dataset("cifar10", **arrays, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def load_cifar100(root: Path, download: bool = False) -> Dataset:
    """CIFAR-100 (fine labels, 100 classes) from ``root/cifar-100-python`` in its official pickle format, fetched by
    torchvision with ``download``; decoded once and cached like CIFAR-10."""
    source = root / "cifar-100-python"
    if download and not source.is_dir():
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=True, download=True)
    if not (source / "train").is_file() or not (source / "test").is_file():
        raise UserError(f"no CIFAR-100 found at {root}: expected cifar-100-python/train and test (the official python version); "
                        "pass --data-root PATH (or set L2O_KD_DATA), or add --download when online")
    cache = _files_cache_path("cifar100", [source / "train", source / "test"])
    if cache.exists():
        arrays = torch.load(cache, weights_only=True)
    else:
        arrays = {}
        for split in ("train", "test"):
            arrays[f"{split}_x"], arrays[f"{split}_y"] = _read_cifar_pickle(source / split, b"fine_labels")
        if int(arrays["train_y"].max()) >= 100 or int(arrays["train_y"].min()) < 0 or len(arrays["train_y"].unique()) != 100:
            raise UserError(f"{source}: expected fine labels 0..99, every class in train")
        save_atomic(arrays, cache)
    return Dataset("cifar100", **arrays, mean=CIFAR100_MEAN, std=CIFAR100_STD, num_classes=100)


def _read_cifar_pickle(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 3 x 32 x 32 uint8) and labels of one file of the official CIFAR python format."""
    import pickle

    import numpy as np

    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = torch.tensor(list(entry[label_key]), dtype=torch.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read {path} as a CIFAR python batch ({type(exc).__name__}: {exc})") from exc
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(data.copy()), labels


def load_imagefolder(root: Path) -> Dataset:
    """Any folder of class folders: ``root/train/<class>/*`` and ``root/test/<class>/*``, or ``root/<class>/*`` whose
    images are cut into train and test (:data:`TEST_FRACTION` of each class, fixed seed). Images are resized to
    :data:`IMAGE_SIZE` squared; the normalization is the train images' per-channel mean and std."""
    if not root.is_dir():
        raise UserError(f"--data-root {root}: not a folder (imagefolder wants class folders of images)")
    cache = _files_cache_path("imagefolder", sorted(f for f in root.rglob("*") if f.is_file()))
    if cache.exists():
        arrays = torch.load(cache, weights_only=True)
    else:
        split_folders = (root / "train").is_dir() and (root / "test").is_dir()
        files = {split: _image_files(root / split) for split in ("train", "test")} if split_folders else {"all": _image_files(root)}
        classes = sorted({cls for items in files.values() for cls, _, _ in items})
        if len(classes) < 2:
            raise UserError(f"{root}: found {len(classes)} class folder(s) with images ({', '.join(IMAGE_SUFFIXES)}); an image "
                            "folder needs at least 2: <class>/<image> (or train/<class>/... and test/<class>/...)")
        arrays = {}
        for split, items in files.items():
            arrays[f"{split}_x"], arrays[f"{split}_y"] = _decode_images(items, classes)
        if not split_folders:
            arrays = _cut_test(arrays.pop("all_x"), arrays.pop("all_y"), len(classes))
        arrays["classes"] = classes
        save_atomic(arrays, cache)
    classes = arrays.pop("classes")
    pixels = arrays["train_x"].float().div(255)
    mean, std = tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).clamp_min(1e-3).tolist())
    return Dataset("imagefolder", **arrays, mean=mean, std=std, num_classes=len(classes))


def _image_files(folder: Path) -> list[tuple[str, str, Path]]:
    return sorted((f.parent.name, f.name, f) for f in folder.glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)


def _decode_images(items: list[tuple[str, str, Path]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for _, _, f in tqdm(items, desc="decoding images (once, then cached)", disable=None, leave=False):
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)))
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"cannot read image {f}: {exc}") from exc
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return x.to(torch.uint8), torch.tensor([classes.index(c) for c, _, _ in items], dtype=torch.int64)


def _cut_test(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """A stratified, fixed (``SPLIT_SEED``) train/test cut: each class gives ``TEST_FRACTION`` of its images (at least one) to test."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < 3:
            raise UserError(f"class {c} has {len(idx)} image(s): each class needs at least 3 (train, val, test)")
        test.append(idx[torch.randperm(len(idx), generator=g)][:max(1, round(len(idx) * TEST_FRACTION))])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return {"train_x": x[~is_test], "train_y": y[~is_test], "test_x": x[is_test], "test_y": y[is_test]}


def _find_cifar10_source(root: Path, download: bool) -> Path:
    """The first readable form of CIFAR-10 under ``root`` (see the module docstring)."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return root
    if (root / "cifar-10-batches-py").is_dir() or download:
        return root / "cifar-10-batches-py"
    for tree in (root, *sorted(p for p in root.glob("*") if p.is_dir())):
        if (tree / "train").is_dir() and (tree / "test").is_dir():
            return tree
    archives = sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))
    if archives:
        return archives[0]
    raise UserError(
        f"no CIFAR-10 found at {root}: expected cifar-10-batches-py/, train/+test/ class folders or a "
        f".tar.gz of them; pass --data-root PATH (or set L2O_KD_DATA), or add --download when online"
    )


def _cache_path_for(source: Path) -> Path:
    stat = source.stat() if source.exists() else None
    key = f"{source.resolve()}|{stat.st_size if stat else 0}|{int(stat.st_mtime) if stat else 0}"
    return cache_dir() / f"cifar10-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def _files_cache_path(name: str, files: list[Path]) -> Path:
    """The cache file of a dataset decoded from ``files``: keyed by their paths, sizes and modification times, so a
    changed, added or removed file means a new decode."""
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return cache_dir() / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def _decode_source(source: Path, download: bool) -> dict[str, torch.Tensor]:
    if source.name == "cifar-10-batches-py":
        return _decode_torchvision(source.parent, download)
    if source.is_file():
        return _decode_archive(source)
    return _decode_tree(source)


def _decode_torchvision(root: Path, download: bool) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise UserError(f"CIFAR-10 at {root} is missing or corrupted ({exc}); add --download when online") from exc
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
    return out


def _decode_archive(path: Path) -> dict[str, torch.Tensor]:
    """Read every image of a ``.tar.gz`` holding ``<any>/train|test/<class>/<file>``."""
    files: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tqdm(tar, desc=f"reading {path.name} (decoded once, then cached)", unit=" files", disable=None, leave=False):
                parts = member.name.split("/")
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES) or len(parts) < 3:
                    continue
                split, cls = parts[-3], parts[-2]
                if split in files:
                    files[split].append((cls, parts[-1], tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read archive {path}: {exc}") from exc
    return _decode_files(files, path)


def _decode_tree(root: Path) -> dict[str, torch.Tensor]:
    files: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for split in files:
        for f in (root / split).glob("*/*"):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files[split].append((f.parent.name, f.name, f.read_bytes()))
    return _decode_files(files, root)


def _decode_files(files: dict[str, list[tuple[str, str, bytes]]], where: Path) -> dict[str, torch.Tensor]:
    import numpy as np
    from PIL import Image

    classes = sorted({cls for items in files.values() for cls, _, _ in items})
    if len(classes) != 10:
        raise UserError(f"{where}: expected 10 class folders under train/ and test/, found {len(classes)}")
    out = {}
    for split, items in files.items():
        items.sort(key=lambda it: (it[0], it[1]))
        progress = tqdm(items, desc=f"decoding {split} images", disable=None, leave=False)  # disable=None: only on a terminal
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, _, b in progress]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images else torch.empty(0, 3, 32, 32)
        out[f"{split}_x"] = x.to(torch.uint8)
        out[f"{split}_y"] = torch.tensor([classes.index(c) for c, _, _ in items], dtype=torch.int64)
    return out


def _check_cifar10(arrays: dict[str, torch.Tensor], source: Path) -> None:
    for split, n in (("train", 50_000), ("test", 10_000)):
        x = arrays[f"{split}_x"]
        if tuple(x.shape) != (n, 3, 32, 32):
            raise UserError(f"{source}: {split} split has shape {tuple(x.shape)}, expected ({n}, 3, 32, 32)")


def make_synthetic(n_train: int = 2000, n_test: int = 500, num_classes: int = 10, seed: int = 1234) -> Dataset:
    """A small, learnable image task: each class is a smooth random template plus strong noise.

    The noise is strong enough that ``tiny`` needs a few hundred steps to pass 75% (chance is 10%),
    so a loss that must fall, and operators that differ, are visible in seconds.
    """
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(num_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] + 8.0 * torch.randn(n, 3, 32, 32, generator=g)
        x = (x * 20 + 128).clamp(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ----------------------------------------------------------------------------------------------
# Batches


class Normalize:
    """uint8-valued images (any dtype) -> float ``(x / 255 - mean) / std`` per channel: the one
    normalization of the project (loaders, teacher logits, meta-training episodes)."""

    def __init__(self, mean, std, device: str | torch.device = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device).float() - self.mean) / self.std


@dataclass
class Batch:
    x: torch.Tensor  # float, normalized, on the device
    y: torch.Tensor
    idx: torch.Tensor  # positions in the split: rows of the cached teacher logits


class BatchLoader:
    """Tensor-resident minibatches of one split.

    The order (and augmentation) of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at
    an epoch boundary sees exactly the batches of an uninterrupted one.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean,
        std,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ):
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std, device)
        self.channels_last = channels_last
        self._last_order: tuple = (None, None)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        g, order = self._order(epoch, seed)
        for b in range(len(self)):
            yield self._batch(order[b * self.batch_size : (b + 1) * self.batch_size], g)

    def batch_at(self, index: int, seed: int = 0) -> Batch:
        """Batch number ``index`` of the endless stream epoch(0), epoch(1), ... (un-augmented loaders):
        a pure function of (index, seed), so a resumed run draws the same batches."""
        assert not self.augment, "batch_at is for un-augmented streams"
        epoch, b = divmod(index, len(self))
        if self._last_order[0] != (epoch, seed):  # one permutation per epoch, not per batch
            self._last_order = ((epoch, seed), self._order(epoch, seed)[1])
        order = self._last_order[1]
        return self._batch(order[b * self.batch_size : (b + 1) * self.batch_size], None)

    def _order(self, epoch: int, seed: int) -> tuple[torch.Generator, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        return g, order.to(self.device)

    def _batch(self, idx: torch.Tensor, g: torch.Generator | None) -> Batch:
        x = self.x[idx].float()
        if self.augment:
            x = random_crop_flip(x, g)
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(x, self.y[idx], idx)


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translation (zero padding) and horizontal flip of a whole batch at once."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
