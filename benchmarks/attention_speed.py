"""All of MiniLM's attention maps ready for display: ours against transformers, same run.

Ours: ``unitscale_core.pretrained.attention_probs`` (one eager forward with capture, probabilities
as a float32 numpy array ``[layers, heads, T, T]``). Theirs: ``transformers.AutoModel`` (eager
attention) with ``output_attentions=True``, the attentions stacked into one numpy array. Same
token ids, same threads, results checked equal (1e-4), timed alternately; medians.

    python benchmarks/attention_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import paired_medians_ms, parser, ratio_entry, report  # noqa: E402

from unitscale_core import pretrained  # noqa: E402

LENGTHS = (128, 512)


def run(repeats: int = 5) -> dict:
    """``attention_vs_transformers_{128,512}``: ``{"ours_ms", "theirs_ms", "ratio"}``."""
    import transformers

    transformers.logging.set_verbosity_error()
    ours = pretrained.minilm()
    theirs = transformers.AutoModel.from_pretrained(
        ours.folder, attn_implementation="eager", local_files_only=True).eval()
    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    for t in LENGTHS:
        ids = torch.randint(1000, 20000, (1, t), generator=gen)

        def run_ours(ids=ids):
            return pretrained.attention_probs(ours, ids)

        def run_theirs(ids=ids):
            with torch.no_grad():
                att = theirs(input_ids=ids, output_attentions=True).attentions
            return np.stack([a[0].numpy() for a in att])

        np.testing.assert_allclose(run_ours(), run_theirs(), atol=1e-4)  # also warms both
        o, th = paired_medians_ms(run_ours, run_theirs, repeats)
        out[f"attention_vs_transformers_{t}"] = ratio_entry(o, th)
    return out


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
