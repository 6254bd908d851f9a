"""Datasets: Fashion-MNIST (idx files), shifted Fashion-MNIST, an ImageNet-layout folder, and synthetic data
for smoke tests.

Shifted Fashion-MNIST (`fashion-mnist-shifted`) places each item on a 56x56 canvas at a position drawn once
per image from a fixed seed (the same in every epoch and run, so the validation set never changes): objects
anywhere in the frame, where a token rule of fixed positions throws content away. Train at --img-size 56 to
see the canvas at full resolution. `fashion-mnist-shifted-N` takes an N x N canvas (e.g. 84: the item covers a
ninth of the frame, 16 of 144 patches at patch size 7; train at --img-size N).

Images reach the model shaped and normalised by the model's timm data config.
Fashion-MNIST stays in memory as uint8 and is converted per batch (fast on 2 cores).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import SlimError

FMNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
    "~/.cache/slimdeploy/fashion-mnist/FashionMNIST/raw",  # torchvision download (scripts/get_data.sh)
)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_fashion_mnist() -> Path:
    """The folder holding the Fashion-MNIST idx files ($SLIMDEPLOY_FMNIST_DIR first)."""
    candidates = [os.environ.get("SLIMDEPLOY_FMNIST_DIR", "")] + list(FMNIST_DIRS)
    for c in candidates:
        if c and _idx_path(Path(c).expanduser(), FMNIST_FILES["val"][0]) is not None:
            return Path(c).expanduser()
    raise SlimError("Fashion-MNIST not found: run 'make setup' (installs Debian's dataset-fashion-mnist) "
                    "or set SLIMDEPLOY_FMNIST_DIR to a folder with the idx files")


def _idx_path(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not a uint8 idx file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        body = data[4 + 4 * ndim:]
        if len(body) != int(torch.tensor(shape).prod()):
            raise ValueError("truncated")
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise SlimError(f"cannot read {path}: {e}") from None
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


class TensorImages(Dataset):
    """Images held as a uint8 (N, C, H, W) or float tensor, with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@dataclass
class BatchTransform:
    """uint8 or float batch -> normalised float batch at the model's input size and channels."""

    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if x.shape[1] != self.in_chans:
            x = x.mean(1, keepdim=True).expand(-1, self.in_chans, -1, -1)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _collate(transform: BatchTransform):
    def collate(items):
        x = torch.stack([i[0] for i in items])
        y = torch.as_tensor([int(i[1]) for i in items], dtype=torch.long)
        return transform(x), y
    return collate


def fashion_mnist(split: str) -> TensorImages:
    folder = find_fashion_mnist()
    img_stem, lbl_stem = FMNIST_FILES[split]
    images = read_idx(_idx_path(folder, img_stem) or folder / img_stem)
    labels = read_idx(_idx_path(folder, lbl_stem) or folder / lbl_stem).long()
    if images.shape[0] != labels.shape[0]:
        raise SlimError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return TensorImages(images.unsqueeze(1), labels)


SHIFTED_CANVAS = 56
SHIFTED_SEEDS = {"train": 1, "val": 2}


class ShiftedImages(Dataset):
    """Each image of `base` on an empty canvas x canvas, at a position fixed per image by `seed`."""

    def __init__(self, base: TensorImages, canvas: int, seed: int):
        c, h, w = base.images.shape[1:]
        if canvas < max(h, w):
            raise SlimError(f"a canvas of {canvas} pixels is smaller than the images ({h}x{w})")
        self.base, self.canvas, self.shape = base, canvas, (c, h, w)
        g = torch.Generator().manual_seed(seed)
        n = len(base)
        self.offsets = torch.stack([torch.randint(0, canvas - h + 1, (n,), generator=g),
                                    torch.randint(0, canvas - w + 1, (n,), generator=g)], 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        c, h, w = self.shape
        out = torch.zeros((c, self.canvas, self.canvas), dtype=img.dtype)
        dy, dx = (int(v) for v in self.offsets[i])
        out[:, dy:dy + h, dx:dx + w] = img
        return out, label


def fashion_mnist_shifted(split: str, canvas: int = SHIFTED_CANVAS) -> ShiftedImages:
    return ShiftedImages(fashion_mnist(split), canvas, SHIFTED_SEEDS[split])


def shifted_canvas(name: str) -> int | None:
    """The canvas of a shifted Fashion-MNIST name ('fashion-mnist-shifted' or '...-shifted-N'), else None."""
    m = re.fullmatch(r"fashion-mnist-shifted(?:-(\d+))?", name)
    return None if m is None else int(m.group(1) or SHIFTED_CANVAS)


def synthetic(split: str, in_chans: int, img_size: int, num_classes: int, n: int) -> TensorImages:
    """A learnable toy problem (class template + noise). For smoke tests only."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(num_classes, in_chans, img_size, img_size, generator=g)
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, in_chans, img_size, img_size, generator=g)
    images = (0.6 * templates[labels] + 0.4 * noise).mul(255).to(torch.uint8)
    return TensorImages(images, labels)


def image_folder(root: Path, split: str, data_cfg: dict, train: bool):
    import timm.data
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise SlimError(f"dataset folder {root} has no '{split}/' subfolder (expected ImageNet layout: "
                        "train/<class>/*.jpg and val/<class>/*.jpg)")
    tf = timm.data.create_transform(**{k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std",
                                                                "crop_pct", "crop_mode") if k in data_cfg},
                                    is_training=train)
    try:
        return ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise SlimError(f"cannot read dataset folder {folder}: {str(e).splitlines()[0]}") from None


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    transform: BatchTransform | None  # None when the dataset already yields normalised tensors
    num_classes: int
    name: str
    train_eval: Dataset | None = None  # the training images with the evaluation transform (selection's scores)
    key: dict | None = None  # what identifies the data: name and limits (for the run's stage records)

    def __post_init__(self):
        if self.train_eval is None:
            self.train_eval = self.train


def load_data(name: str, data_cfg: dict, num_classes: int, train_limit: int | None = None,
              val_limit: int | None = None, with_train: bool = True) -> DataBundle:
    """Resolve --data: 'fashion-mnist', 'fashion-mnist-shifted[-N]', 'synthetic' or a folder in ImageNet layout.

    with_train=False skips the training split (its `train` is then empty), for evaluation only."""
    for v, what in ((train_limit, "--train-limit"), (val_limit, "--val-limit")):
        if v is not None and v <= 0:
            raise SlimError(f"{what} must be a positive number of images")
    in_chans, h, w = data_cfg["input_size"]
    transform = BatchTransform(in_chans, h, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    train_eval = None
    canvas = shifted_canvas(name)
    if name == "fashion-mnist" or canvas is not None:
        def load(split):
            return fashion_mnist(split) if canvas is None else fashion_mnist_shifted(split, canvas)
        val, classes = load("val"), 10
        train = load("train") if with_train else Subset(val, [])
    elif name == "synthetic":
        n_train, n_val = train_limit or 512, val_limit or 256
        train = synthetic("train", in_chans, h, num_classes, n_train)
        val = synthetic("val", in_chans, h, num_classes, n_val)
        classes = num_classes
    else:
        root = Path(name).expanduser()
        if not root.is_dir():
            raise SlimError(f"dataset not found: '{name}' is neither fashion-mnist, fashion-mnist-shifted[-N], "
                            "synthetic nor a folder")
        val = image_folder(root, "val", data_cfg, False)
        train = image_folder(root, "train", data_cfg, True) if with_train else Subset(val, [])
        train_eval = image_folder(root, "train", data_cfg, False) if with_train else train
        classes = len(val.classes)
        transform = None
    if classes != num_classes:
        raise SlimError(f"dataset '{name}' has {classes} classes but the model has {num_classes} outputs "
                        f"(pass --num-classes {classes})")
    train_eval = train if train_eval is None else train_eval
    if train_limit is not None and train_limit < len(train):
        train, train_eval = Subset(train, range(train_limit)), Subset(train_eval, range(train_limit))
    if val_limit is not None and val_limit < len(val):
        val = Subset(val, range(val_limit))
    return DataBundle(train, val, transform, classes, name, train_eval,
                      {"name": name, "train_limit": train_limit, "val_limit": val_limit})


def first_batch(bundle: DataBundle, n: int) -> torch.Tensor:
    """The first n evaluation images, transformed as the model sees them."""
    x, _ = next(iter(make_loader(bundle.val, bundle.transform, n, False)))
    return x


def make_loader(ds: Dataset, transform: BatchTransform | None, batch_size: int, train: bool, seed: int = 0,
                rank: int = 0, world: int = 1, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader that shards across ranks.

    Training: DistributedSampler (also with world=1, so the shuffle order depends only on
    seed and epoch: resuming replays the same order). Evaluation: rank r takes items r, r+world, ...
    without padding, so summed counts are exact.
    """
    if batch_size <= 0:
        raise SlimError("--batch-size must be positive")
    collate = _collate(transform) if transform is not None else None
    if train:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                          drop_last=True, persistent_workers=workers > 0, pin_memory=pin_memory)
    shard = Subset(ds, range(rank, len(ds), world))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory)


def training_images(bundle: DataBundle, n: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A fixed, seeded subset of n training images with the evaluation transform, and their indices (the
    calibration data of selection's scores and of quantization; never the split verify reports on)."""
    ds = bundle.train_eval
    if n < 1:
        raise SlimError("the number of calibration images must be >= 1")
    if len(ds) < n:
        raise SlimError(f"the training set has {len(ds)} images, fewer than the {n} calibration images asked for")
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    loader = DataLoader(Subset(ds, indices), batch_size=256, shuffle=False,
                        collate_fn=_collate(bundle.transform) if bundle.transform is not None else None)
    return torch.cat([x for x, _ in loader]), indices
