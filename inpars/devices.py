"""Devices and dtypes: one place that decides where models run and in which precision.

``auto`` is deterministic, so a retried shard computes with the same precision as its first try:
bf16 on CUDA GPUs that support it and on TPUs; fp32 on CPUs. (On the 2-core VMs we measured, the
AVX512-BF16 path ran bf16 matrix products 1.4-1.6x *slower* than fp32; ask for ``bfloat16``
explicitly on a CPU where it pays.)
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def auto_device_name() -> str:
    """What ``auto`` means in this process.

    ``INPARS_DEVICE`` (``tpu``, ``cuda``, ``cpu``...) if set: the Kubernetes launcher renders it from
    the stage's resources (``tpu`` with ``PJRT_DEVICE=TPU`` when ``resources.<stage>.tpu_type`` is
    set), so a pod uses what it asked for, and a TPU pod whose runtime is broken fails loudly instead
    of training on the host CPU. Else ``tpu`` when ``PJRT_DEVICE=TPU`` (torch_xla's own switch; the
    TPU image sets it), else ``cuda`` when torch sees a GPU, else ``cpu``.
    """
    forced = os.environ.get("INPARS_DEVICE", "").strip().lower()
    if forced and forced != "auto":
        return forced
    if os.environ.get("PJRT_DEVICE", "").strip().upper() == "TPU":
        return "tpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (see :func:`auto_device_name`), ``cpu``, ``cuda[:N]``, ``mps`` or ``tpu``/``xla``.

    TPU goes through torch_xla, imported only when asked for, so CPU and GPU installs never need it.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = auto_device_name()
    if name in ("tpu", "xla"):
        try:
            import torch_xla  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("device 'tpu' needs torch_xla (pip install torch_xla[tpu]; the inpars:tpu image has it)") from None
        return torch_xla.device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps or tpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on bf16-capable CUDA GPUs and TPUs, else fp32; or an explicit dtype name."""
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)")
        return DTYPES[name]
    device = torch.device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "xla":
        return torch.bfloat16
    return torch.float32


def device_count(device: torch.device) -> int:
    """How many devices of ``device``'s kind this process can use: every GPU the pod was given, every
    TPU chip of the host (torch_xla's runtime view), else 1."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    if device.type == "xla":
        import torch_xla.runtime as xr  # type: ignore[import-not-found]

        return xr.global_runtime_device_count()
    return 1
