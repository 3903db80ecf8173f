"""A device checked before loading: one this machine cannot give is one clear line, not torch's
"Torch not compiled with CUDA enabled" assertion from deep inside the loader. The CLI checks
`--device`, Engine.from_pretrained its `device=` setting."""
from __future__ import annotations


def check_device(device: str | None, flag: str = "--device") -> None:
    """Raises ValueError for a device string torch does not know, or a CUDA device not present.
    flag: how the message names the setting (`--device` on the command line, `device=` in Python)."""
    if device is None:
        return
    import torch

    cli = flag.startswith("--")
    name = f"{flag} {device}" if cli else f"{flag}{device!r}"
    unset = f"leave {flag} out" if cli else f"leave {flag.rstrip('=')} unset"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{name} is not a device ({e})") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA is not available on this machine (torch {torch.__version__}); "
                         f"{unset} to run on the CPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
