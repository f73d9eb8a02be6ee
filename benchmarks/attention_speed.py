"""All of MiniLM's attention maps ready for display: ours against transformers, same run.

Ours: ``unitscale_core.pretrained.attention_probs`` (one eager forward with capture, probabilities
as a float32 numpy array). Theirs: ``transformers.AutoModel`` (eager attention) with
``output_attentions=True``, the attentions stacked into one numpy array. Same token ids,
medians of several repeats, one thread count for both.

    python benchmarks/attention_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

import json
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import median_ms, parser  # noqa: E402

from unitscale_core import pretrained  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    from transformers import AutoModel

    ours = pretrained.minilm()
    theirs = AutoModel.from_pretrained(ours.folder, attn_implementation="eager").eval()
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
                            f"{torch.__version__}, {torch.get_num_threads()} threads"}
    for t in (128, 512):
        ids = torch.randint(1000, 20000, (1, t))

        def run_ours(ids=ids):
            return pretrained.attention_probs(ours, ids)

        def run_theirs(ids=ids):
            with torch.no_grad():
                att = theirs(input_ids=ids, output_attentions=True).attentions
            return np.stack([a[0].numpy() for a in att])

        np.testing.assert_allclose(run_ours(), run_theirs(), atol=1e-4)  # also warms both
        o, th = median_ms(run_ours, args.repeats), median_ms(run_theirs, args.repeats)
        out[f"attention_vs_transformers_{t}"] = {"ours_ms": round(o, 1),
                                                 "theirs_ms": round(th, 1),
                                                 "ratio": round(o / th, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for key, value in out.items():
        print(f"{key:30s} {value}")


if __name__ == "__main__":
    main()
