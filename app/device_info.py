"""Which torch device a run would use, described for the status bar.

Importing torch takes about a second, so the window asks for this off the main thread and
shows it when it arrives. It only queries availability; model runs belong to the worker.
"""

from __future__ import annotations


def describe_device(preference: str = "auto") -> str:
    """'CUDA: <name> · torch 2.x' / 'CPU · torch 2.x' for the device ``preference`` selects."""
    import torch

    warm_up_torch()
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


def warm_up_torch() -> None:
    """Run torch's lazy imports (``nn.init`` pulls in ``torch.distributed.tensor``, sympy,
    mpmath: about two seconds holding the GIL) now, off the main thread right after the first
    paint, instead of inside the first model job, where they would stall the window while
    the user waits for it. Initialising a tensor on the meta device (how a checkpoint is
    shaped before its weights are read) imports ``torch._dynamo`` the first time: another
    second, in chunks of up to 150 ms, that used to stall the window when the attention tab
    first loaded all-MiniLM-L6-v2."""
    import torch

    torch.nn.Linear(2, 2)(torch.zeros(1, 2)).sum().backward()
    torch.empty(1, device="meta").normal_()
    # and the modules the first measurement, attention map or training run would import: on
    # the GUI thread (Measure imports unitscale_core.measure) that took 80-90 ms, PySide's
    # import hook reading each new module's source to look for its feature flags
    import unitscale_core.attention_views  # noqa: F401
    import unitscale_core.measure  # noqa: F401
    import unitscale_core.training  # noqa: F401
