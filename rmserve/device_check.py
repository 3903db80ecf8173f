"""`--device` checked before loading: a device this machine cannot give is one clear line, not
torch's "Torch not compiled with CUDA enabled" assertion from deep inside the loader."""
from __future__ import annotations


def check_device(device: str | None) -> None:
    """Raises ValueError for a device string torch does not know, or a CUDA device not present."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device ({e})") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "leave --device out to run on the CPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
