"""The ``unitscale`` command line: the headless side of Unit Scaling Explorer.

User errors (bad config, bad flag value) print one line to stderr and exit 2, never a
traceback. This is the only module that writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import DEVICES, PARAMETRIZATIONS, ModelConfig, load
from .sizing import format_bytes, format_count, size_report

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in the command line that the user can fix."""


def _load_config(path: str | None) -> ModelConfig:
    return ModelConfig() if path is None else load(path)


def cmd_params(args: argparse.Namespace) -> str:
    """Size breakdown: parameters, FLOPs per token, training memory, KV cache."""
    cfg = _load_config(args.config)
    report = size_report(cfg)
    if args.json:
        return json.dumps(report, indent=2)
    lines = [f"parameters      {report['total']:>18,}  ({format_count(report['total'])})"]
    for name, count in report["components"].items():
        lines.append(f"  {name:<14}{count:>18,}")
    flops = report["flops_per_token"]
    lines.append(f"FLOPs/token     forward {format_count(flops['forward'])}, "
                 f"training {format_count(flops['training'])}")
    mem = report["memory_bytes"]
    lines.append(f"training memory {format_bytes(mem['total'])} ({cfg.dtype}, Adam, batch "
                 f"{cfg.batch_size} × {cfg.seq_len})")
    for key in ("weights", "gradients", "optimizer", "activations"):
        lines.append(f"  {key:<14}{format_bytes(mem[key]):>18}")
    lines.append(f"KV cache        {format_bytes(mem['kv_cache'])}")
    return "\n".join(lines)


def cmd_positional(args: argparse.Namespace) -> str:
    """Write a positional encoding as .npy (see positional_views.export_array for shapes)."""
    import numpy as np

    from .atomic import atomic_open
    from .positional_views import ViewSpec, export_array, minilm_folder

    if args.kind != "learned" and args.model is not None:
        raise UserError(f"--model is only for --kind learned, not {args.kind}")
    folder = None if args.model in (None, "minilm") else args.model
    if args.kind == "learned" and folder is None:
        folder = minilm_folder()
    spec = ViewSpec(kind=args.kind, length=args.max_len, d_model=args.d_model,
                    n_heads=args.heads, base=args.base, buckets=args.buckets,
                    max_distance=args.max_distance, bidirectional=not args.causal)
    array = export_array(spec, folder)
    with atomic_open(args.out, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return f"wrote {args.out}: {args.kind}, shape {list(array.shape)}, {array.dtype}"


def _with_param(cfg: ModelConfig, param: str | None) -> ModelConfig:
    return cfg if param is None else cfg.replace(parametrization=param)


def _rows_text(rows) -> str:
    lines = [f"{'kind':<16} {'tensor':<36} {'rms':>11}  {'log2':>6}"]
    for r in rows:
        log2 = f"{math.log2(r.rms):6.1f}" if r.rms > 0 and math.isfinite(r.rms) else "     -"
        lines.append(f"{r.kind:<16} {r.name:<36} {r.rms:11.4g}  {log2}")
    return "\n".join(lines)


def _rows_output(cfg: ModelConfig, source: str, rows, as_json: bool) -> str:
    """``predict`` and ``measure`` print the same shape: config, parametrization, tensors."""
    if not as_json:
        return _rows_text(rows)
    return json.dumps({"config": cfg.to_dict(), "parametrization": cfg.parametrization,
                       "source": source, "tensors": [r.to_json() for r in rows]}, indent=1)


def cmd_predict(args: argparse.Namespace) -> str:
    """Analytic RMS of every tensor at initialisation (no model is built)."""
    from .scaling.predict import predict

    cfg = _with_param(_load_config(args.config), args.param)
    return _rows_output(cfg, "predicted", predict(cfg), args.json)


def cmd_seed_formula(args: argparse.Namespace) -> str:
    """The seed document's d_e = log P_t / log α, Parameters = β · d_e."""
    from .scaling.seed_formula import seed_formula

    out = seed_formula(args.target, args.alpha, args.beta)
    if args.json:
        return json.dumps({"d_e": out.d_e, "parameters": out.parameters,
                           "warning": out.warning}, indent=2)
    text = f"d_e = {out.d_e:.6g}\nparameters = {out.parameters:.6g}"
    return text + (f"\nwarning: {out.warning}" if out.warning else "")


def cmd_attention(args: argparse.Namespace) -> str:
    """Every layer's attention for a text, written to an .npz (no pickle needed to read)."""
    import numpy as np

    from .atomic import atomic_open
    from .attention_views import checkpoint_attentions, configured_attentions

    if (args.model is None) == (args.config is None):
        raise UserError("give exactly one of --model minilm|FOLDER and --config FILE")
    if args.config is not None:
        result = configured_attentions(load(args.config), args.text)
    else:
        from . import pretrained

        loaded = pretrained.minilm() if args.model == "minilm" else \
            pretrained.load_checkpoint(args.model)
        result = checkpoint_attentions(loaded, args.text)
    arrays = {"attentions": result.attentions.astype(np.float32),
              "tokens": np.array(result.tokens, dtype=np.str_)}
    if result.cross_attentions is not None:
        arrays["cross_attentions"] = result.cross_attentions.astype(np.float32)
        arrays["encoder_attentions"] = result.encoder_attentions.astype(np.float32)
    with atomic_open(args.out, "wb") as handle:
        np.savez(handle, **arrays)
    shape = list(result.attentions.shape)
    cut = f"; text cut by {result.truncated} tokens to fit" if result.truncated else ""
    return f"wrote {args.out}: attentions {shape} (layers, heads, query, key){cut}"


def cmd_measure(args: argparse.Namespace) -> str:
    """One forward+backward pass; RMS of every tensor (same JSON shape as ``predict``)."""
    from .measure import measure

    cfg = _with_param(_load_config(args.config), args.param)
    if args.device is not None:
        cfg = cfg.replace(device=args.device)
    return _rows_output(cfg, "measured", measure(cfg), args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitscale",
        description="Unit Scaling Explorer, headless: sizes and scales of Transformer configs.",
    )
    parser.add_argument("--version", action="version", version=f"unitscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_command(name: str, help_text: str, func, param: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", metavar="FILE",
                       help="a .json or .toml config (default: built-in)")
        if param:
            p.add_argument("--param", choices=PARAMETRIZATIONS,
                           help="override the file's parametrization")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    config_command("params", "parameter count, FLOPs per token and memory of a config",
                   cmd_params, param=False)
    config_command("predict", "predict every tensor's RMS at initialisation", cmd_predict,
                   param=True)

    p = sub.add_parser("seed-formula",
                       help="the seed document's formula d_e = log P_t / log α (not Unit Scaling)")
    p.add_argument("--target", type=float, required=True, metavar="P", help="P_t > 0")
    p.add_argument("--alpha", type=float, required=True, metavar="A", help="α > 0, α ≠ 1")
    p.add_argument("--beta", type=float, required=True, metavar="B", help="β > 0")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_seed_formula)

    p = config_command("measure", "measure every tensor's RMS in one training step",
                       cmd_measure, param=True)
    p.add_argument("--device", choices=DEVICES, help="override the device")

    p = sub.add_parser("attention", help="write every layer's attention for a text to .npz")
    p.add_argument("--model", metavar="minilm|FOLDER",
                   help="the bundled MiniLM or a safetensors checkpoint folder")
    p.add_argument("--config", metavar="FILE", help="a configured model (random init)")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("positional", help="write a positional encoding to a .npy file")
    p.add_argument("--kind", required=True,
                   choices=("sinusoidal", "learned", "relative", "rope", "alibi"))
    p.add_argument("--max-len", type=int, required=True, metavar="N", help="positions")
    p.add_argument("--d-model", type=int, default=512, metavar="D",
                   help="width (sinusoidal) or rotated size (rope); default 512")
    p.add_argument("--heads", type=int, default=8, metavar="H", help="ALiBi heads (default 8)")
    p.add_argument("--buckets", type=int, default=32, metavar="B", help="T5 buckets (32)")
    p.add_argument("--max-distance", type=int, default=128, metavar="M",
                   help="T5 max distance (128)")
    p.add_argument("--causal", action="store_true", help="T5 causal (unidirectional) buckets")
    p.add_argument("--base", type=float, default=10000.0, metavar="B",
                   help="sinusoidal / rope base (10000)")
    p.add_argument("--model", metavar="minilm|FOLDER",
                   help="learned: the bundled MiniLM (default) or a safetensors checkpoint folder")
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.set_defaults(func=cmd_positional)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0) and EXIT_USER_ERROR
    func: Callable[[argparse.Namespace], str] = args.func
    try:
        out = func(args)
    except ValueError as exc:  # ConfigError and every user-caused error subclass ValueError
        print(f"unitscale {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        print(out)
    except BrokenPipeError:  # `unitscale … | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    main_exit()
