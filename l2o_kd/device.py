"""The compute device: checking that it exists, and the peak memory a run used on it."""

from __future__ import annotations

import torch

from .errors import UserError


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked, but CUDA is not available on this machine: use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"unknown device {device!r}: use cpu or cuda")


def peak_memory_mb(device: str) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU; on CPU the peak resident set of the
    whole process (an upper bound for the run, shared by everything the process did before)."""
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB
