"""Teachers and students by name, and the functional view of a model (params + buffers dicts).

* ``resnet8/20/56``: the CIFAR ResNets of He et al. (2016), depth 6n+2, widths 16/32/64, with the
  parameter-free "option A" shortcut (stride-2 subsampling, zero-padded channels).
* ``tiny``: the student of Gorpinich et al.: three unpadded 3x3 convs (8/16/32 channels), each with
  BatchNorm, ReLU and 2x2 max-pool, then FC 128 -> 64 -> 10 (15,050 parameters).
* ``tiny_wide``: ``tiny`` with 1.5x the channels, a second member of the meta-training family.
* ``small``: padded convs 32/64/128, global pooling, FC 128 -> 10 (about 95k parameters).

Every model runs its convolutions on channels-last activations (:data:`MEMORY_FORMAT`): the same
function, on a 2-core CPU forward passes 1.3-2.0x and forward+backward 1.0-1.4x faster (max-pooling alone
3-10x), measured in docs/results/step-cost.md. Only the float rounding differs from channels-first (~1e-6 relative
in the logits; teacher logits cached by an older version were computed channels-first).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import UserError

Params = dict[str, torch.Tensor]
MEMORY_FORMAT = torch.channels_last


class _ShortcutA(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Layout:
    """Models lay their input out as ``activation_format`` (channels-last, :data:`MEMORY_FORMAT`); None keeps
    it as given, which ``vmap`` needs (it cannot re-lay-out a batched tensor): see :func:`as_given_layout`."""

    activation_format: torch.memory_format | None = MEMORY_FORMAT

    def laid_out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation_format is None else x.contiguous(memory_format=self.activation_format)


@contextmanager
def as_given_layout(model: nn.Module):
    """Within the block, ``model`` runs on its input's memory layout as given (its result the same up to rounding)."""
    saved = model.activation_format
    model.activation_format = None
    try:
        yield model
    finally:
        model.activation_format = saved


class CifarResNet(_Layout, nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.laid_out(x)
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNet(_Layout, nn.Module):
    """conv-BN-ReLU-maxpool per width, then an MLP head (``tiny`` and its variations, ``small``)."""

    def __init__(self, widths=(8, 16, 32), hidden: int | None = 64, padding: int = 0, num_classes: int = 10, downsample: int = 1):
        super().__init__()
        self.downsample = downsample  # > 1: the input is average-pooled by this factor first (a cheap task's student)
        blocks, c_in, size = [], 3, 32 // downsample
        for w in widths:
            blocks += [nn.Conv2d(c_in, w, 3, 1, padding), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = w, (size - 2 + 2 * padding) // 2
        self.features = nn.Sequential(*blocks)
        if hidden is None:  # global average pooling straight into the classifier
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
        else:
            flat = c_in * size * size
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x
        return self.head(self.features(self.laid_out(x)))


class MLP(nn.Module):
    """A one-hidden-layer ReLU MLP on the image average-pooled by ``downsample`` (a cheap task's student)."""

    def __init__(self, hidden: int = 32, downsample: int = 4, num_classes: int = 10):
        super().__init__()
        self.downsample = downsample
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * (32 // downsample) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    activation_format = None  # no convolutions: any layout (and vmap) as given

    def forward(self, x):
        return self.net(F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x)


MODELS: dict[str, Callable[[int], nn.Module]] = {  # name -> constructor of the model for that many classes
    "tiny": lambda n: ConvNet((8, 16, 32), hidden=64, num_classes=n),
    "tiny_wide": lambda n: ConvNet((12, 24, 48), hidden=64, num_classes=n),
    "tiny_narrow": lambda n: ConvNet((6, 12, 24), hidden=48, num_classes=n),  # the meta-training family's variations of width
    "tiny_deep": lambda n: ConvNet((8, 16, 32, 32), hidden=64, padding=1, num_classes=n),  # ... and of depth
    "small": lambda n: ConvNet((32, 64, 128), hidden=None, padding=1, num_classes=n),
    "resnet8": lambda n: CifarResNet(8, n),
    "resnet20": lambda n: CifarResNet(20, n),
    "resnet56": lambda n: CifarResNet(56, n),
    # Cheap tasks of meta-training: students that see the image average-pooled to 16x16 or 8x8 (the teacher's
    # logits of the full image stay their KD targets); a step costs a fraction of tiny's on 32x32.
    "cnn16": lambda n: ConvNet((8, 16, 32), hidden=64, padding=1, downsample=2, num_classes=n),
    "cnn16_wide": lambda n: ConvNet((12, 24, 48), hidden=64, padding=1, downsample=2, num_classes=n),
    "mlp8": lambda n: MLP(32, downsample=4, num_classes=n),
    "mlp16": lambda n: MLP(64, downsample=2, num_classes=n),
}
TEACHERS = ("resnet20", "resnet56")
STUDENTS = ("tiny", "tiny_wide", "tiny_narrow", "tiny_deep", "small", "resnet8")
CHEAP_STUDENTS = ("cnn16", "cnn16_wide", "mlp8", "mlp16")


def check_model(name: str) -> None:
    """One line naming the models when ``name`` is not one of them."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def build_model(name: str, seed: int | None = None, num_classes: int = 10) -> nn.Module:
    """A fresh model with ``num_classes`` outputs; with ``seed`` its initialization is reproducible."""
    check_model(name)
    if seed is None:
        return MODELS[name](num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """Detached copies of a model's parameters and buffers, the functional core's two dicts."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers


def apply(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, train: bool) -> torch.Tensor:
    """Forward pass of ``model`` with the given tensors. In train mode BatchNorm updates ``buffers``
    in place (running statistics are not differentiated), in eval mode it uses them."""
    model.train(train)
    return functional_call(model, (params, buffers), (x,), tie_weights=False, strict=True)


def like_param(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` in the memory layout of its parameter ``p``. A conv weight's gradient comes back channels-last
    (activations are, :data:`MEMORY_FORMAT`); an operator that followed it would hand the convolutions
    weights in another layout than the model's, a slower path that differs by operator."""
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def frozen(buffers: Params) -> Params:
    """Copies of BatchNorm buffers for an extra train-mode forward pass (a validation batch, a
    replayed step): it normalizes with batch statistics and leaves the real running statistics alone."""
    return {k: v.clone() for k, v in buffers.items()}
