"""The ``unitscale`` command line: the headless side of Unit Scaling Explorer.

User errors (bad config, bad flag value) print one line to stderr and exit 2, never a
traceback. This is the only module that writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import DEVICES, DTYPES, PARAMETRIZATIONS, ModelConfig, load
from .sizing import format_bytes, format_count, size_report
from .tasks import TASKS

EXIT_USER_ERROR = 2
#: Entry-point group through which other installed packages add commands: each entry point
#: names a ``register(subparsers)`` that adds its sub-parser and sets ``func`` (the Qt app
#: adds ``report`` this way, so this module never imports it).
COMMAND_GROUP = "unitscale.commands"

log = logging.getLogger(__name__)


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


def _rows_output(cfg: ModelConfig, source: str, rows, as_json: bool,
                 warnings: list[str]) -> str:
    """``predict`` and ``measure`` print the same shape: config, parametrization, source,
    tensors and ``warnings`` (a list of lines; in text, one ``warning:`` line each)."""
    if not as_json:
        return _rows_text(rows) + "".join(f"\nwarning: {w}" for w in warnings)
    return json.dumps({"config": cfg.to_dict(), "parametrization": cfg.parametrization,
                       "source": source, "tensors": [r.to_json() for r in rows],
                       "warnings": warnings}, indent=1)


def cmd_predict(args: argparse.Namespace) -> str:
    """Analytic RMS of every tensor at initialisation (no model is built); warnings: where
    the stack's tokens collapse below the resolution of its dtype."""
    from .scaling.predict import predict, stream_collapse

    cfg = _with_param(_load_config(args.config), args.param)
    rows = predict(cfg)
    collapse = stream_collapse(cfg)
    return _rows_output(cfg, "predicted", rows, args.json,
                        [collapse.describe()] if collapse is not None else [])


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
    """One forward+backward pass (or ``--seeds`` of them, combined by geometric mean); RMS
    of every tensor (same JSON shape as ``predict``; warnings: tensors that are not
    finite)."""
    from .measure import measure_seeds

    cfg = _with_param(_load_config(args.config), args.param)
    if args.device is not None:
        cfg = cfg.replace(device=args.device)
    if not 1 <= args.seeds <= 64:
        raise UserError(f"--seeds: {args.seeds} is not between 1 and 64")
    rows = measure_seeds(cfg, args.seeds)
    bad = [f"{r.name} ({r.kind})" for r in rows if not math.isfinite(r.rms)]
    warnings = [f"{len(bad)} tensors are not finite: " + ", ".join(bad[:3])
                + (", …" if len(bad) > 3 else "")] if bad else []
    return _rows_output(cfg, "measured", rows, args.json, warnings)


def cmd_train(args: argparse.Namespace) -> str:
    """Train a config for a number of steps; losses and per-step scale statistics."""
    import time

    from .measure import resolve_device
    from .training import TrainingRun, TrainSettings, default_training_config

    cfg = default_training_config() if args.config is None else load(args.config)
    given = {"parametrization": args.param, "dtype": args.dtype, "task": args.task,
             "steps": args.steps, "lr": args.lr, "log_every": args.log_every,
             "seed": args.seed}
    settings = TrainSettings(loss_scaling=args.loss_scaling,
                             **{k: v for k, v in given.items() if v is not None})
    device = resolve_device(args.device or "cpu")
    start = time.perf_counter()
    run = TrainingRun(cfg, settings, device)
    run.run(run.settings.steps)
    seconds = time.perf_counter() - start
    if args.checkpoint is not None:
        run.save_checkpoint(args.checkpoint)
    s = run.settings
    logged = [r for r in run.records if r.kind_rms is not None]
    if args.json:
        return json.dumps({
            "config": run.config.to_dict(), "settings": s.to_dict(),
            "loss": [r.loss if math.isfinite(r.loss) else None for r in run.records],
            "logged": [{k: v for k, v in r.to_json().items()
                        if k in ("step", "kind_rms", "underflow", "loss_scale", "skipped")}
                       for r in logged],
            "seconds": seconds}, indent=1)
    lines = [f"{'step':>5} {'loss':>9} {'scale':>8} {'skip':>4}  {'rms act':>9} "
             f"{'rms grad':>9}  {'E5M2 underflow: grad_act':>24} {'grad_w':>7}"]
    for r in run.records:
        line = f"{r.step:>5} {r.loss:>9.4f} {r.loss_scale:>8.3g} {'yes' if r.skipped else '':>4}"
        if r.kind_rms is not None and r.underflow is not None:
            line += (f"  {r.kind_rms['activation']:>9.3g} {r.kind_rms['grad_activation']:>9.3g}"
                     f"  {r.underflow['grad_activation']['fp8_e5m2']:>24.2%}"
                     f" {r.underflow['grad_weight']['fp8_e5m2']:>7.2%}")
        lines.append(line)
    lines.append(f"{run.step} steps in {seconds:.1f} s: {s.parametrization}, {s.dtype}, task "
                 f"{s.task}, lr {s.lr:g}, loss scaling {'on' if s.loss_scaling else 'off'}")
    if args.checkpoint is not None:
        lines.append(f"wrote {args.checkpoint}")
    return "\n".join(lines)


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
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="measure N initialisations (seed, seed+1, …) and report each "
                        "tensor's geometric-mean RMS (default 1)")

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

    p = sub.add_parser("train", help="train a config (byte-level LM or a toy task) and report "
                       "losses, tensor scales and FP8/FP16 underflow per step")
    p.add_argument("--config", metavar="FILE",
                   help="a .json or .toml config (default: the tiny preset with vocab_size 256)")
    p.add_argument("--param", choices=PARAMETRIZATIONS, help="override the parametrization")
    p.add_argument("--dtype", choices=DTYPES, help="override the number format "
                   "(fp8_* simulate FP8 on matmul inputs and gradients)")
    p.add_argument("--task", choices=TASKS, help="lm (corpus bytes; default), copy, reverse or "
                   "sort")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (default 80)")
    p.add_argument("--lr", type=float, metavar="X",
                   help="Adam learning rate (default per parametrization)")
    p.add_argument("--loss-scaling", action="store_true",
                   help="dynamic loss scaling as torch.amp.GradScaler (default off)")
    p.add_argument("--log-every", type=int, metavar="K",
                   help="tensor statistics every K steps (default 1)")
    p.add_argument("--seed", type=int, metavar="S", help="override the config's seed")
    p.add_argument("--device", choices=DEVICES, help="where to train (default cpu)")
    p.add_argument("--checkpoint", metavar="OUT.safetensors",
                   help="save weights and optimizer state at the end")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_train)
    _add_contributed_commands(sub)
    return parser


def _add_contributed_commands(sub) -> None:
    """Commands other installed packages contribute (entry-point group ``COMMAND_GROUP``).
    One that cannot be loaded (its package broken or half-installed) is left out and logged;
    the built-in commands keep their names."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name in sub.choices:
            continue
        try:
            register = ep.load()
        except (ImportError, AttributeError) as exc:
            log.warning("command %r from %s not loaded: %s", ep.name, ep.value, exc)
            continue
        register(sub)


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
