"""Which torch device a run would use, described for the status bar.

Importing torch takes about a second, so the window asks for this off the main thread and
shows it when it arrives. It only queries availability; model runs belong to the worker.
"""

from __future__ import annotations


def describe_device(preference: str = "auto") -> str:
    """'CUDA: <name> · torch 2.x' / 'CPU · torch 2.x' for the device ``preference`` selects."""
    import torch

    version = f"torch {torch.__version__}"
    cuda = torch.cuda.is_available()
    if preference in ("auto", "cuda") and cuda:
        return f"CUDA: {torch.cuda.get_device_name(0)} · {version}"
    mps = getattr(torch.backends, "mps", None)
    if preference == "auto" and mps is not None and mps.is_available():
        return f"MPS · {version}"
    if preference == "cuda":
        return f"CPU (no CUDA device found) · {version}"
    return f"CPU · {version}"
