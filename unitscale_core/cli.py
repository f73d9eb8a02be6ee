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
from .atomic import FileProblem, check_destination
from .blas_threads import use_one_blas_thread
from .config import DEVICES, DTYPES, PARAMETRIZATIONS, ModelConfig, load_with_warnings
from .formatting import number
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


class ResultsNotSaved(UserError):
    """The work finished but its file could not be written: ``output`` (the results) is
    printed before the one-line error, so nothing computed is lost."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


class RunStopped(ResultsNotSaved):
    """The work stopped early (a training run whose loss stopped being finite): ``output``
    (what it did) is printed before the one-line reason, and the exit status is 2."""


#: What a command without ``--config`` uses, as said on stderr.
DEFAULT_CONFIG_NOTE = ("no --config given: using the built-in default config (the tiny "
                       "preset: decoder, d_model 256, 4 layers, vocab 8192)")


def _load_config(path: str | None, command: str = "unitscale") -> ModelConfig:
    if path is None:
        print(f"unitscale {command}: note: {DEFAULT_CONFIG_NOTE}", file=sys.stderr)
        return ModelConfig()
    return load(path, command)


def load(path: str, command: str = "unitscale") -> ModelConfig:
    """A config file, a Hugging Face config.json or a folder holding one; the import's
    warnings (what the program does not compute as the checkpoint's model does) go to stderr,
    one line each."""
    cfg, warnings = load_with_warnings(path)
    for line in warnings:
        print(f"unitscale {command}: warning: {line}", file=sys.stderr)
    return cfg


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Rows ``(label, value, note)`` as lines: labels left-aligned in one column, values
    right-aligned in the next, notes after them."""
    label_w = max(len(label) for label, _, _ in rows) + 2
    value_w = max(len(value) for _, value, _ in rows)
    return [f"{label:<{label_w}}{value:>{value_w}}{'  ' + note if note else ''}".rstrip()
            for label, value, note in rows]


def cmd_params(args: argparse.Namespace) -> str:
    """Size breakdown: parameters, FLOPs per token, training memory, KV cache."""
    cfg = _load_config(args.config, "params")
    report = size_report(cfg)
    if args.json:
        return json.dumps(report, indent=2)
    source = "built-in default (tiny preset)" if args.config is None else args.config
    rows = [("parameters", f"{report['total']:,}", f"({format_count(report['total'])})")]
    if cfg.is_moe:  # a dense model's active count is its total
        rows.append(("  active per token", f"{report['active']:,}",
                     f"({format_count(report['active'])}: router + {cfg.experts_per_token} "
                     f"of {cfg.n_experts} experts per layer; FLOPs use these)"))
    rows += [(f"  {name}", f"{count:,}", "") for name, count in report["components"].items()]
    flops = report["flops_per_token"]
    # PaLM's count (QKᵀ and A·V both) is the headline: MFU figures are quoted against it.
    rows += [("FLOPs/token, forward (PaLM, headline)", format_count(flops["forward_palm"]),
              "2·N + 4·L·s·a·d (N: the matmul weights a token uses)"),
             ("FLOPs/token, training (PaLM, headline)", format_count(flops["training_palm"]),
              "6·N + 12·L·s·a·d (QKᵀ and A·V counted)"),
             ("  of which attention (PaLM)", format_count(flops["attention_palm"]), ""),
             ("FLOPs/token, forward (Kaplan)", format_count(flops["forward"]),
              "2·N + 2·L·s·a·d"),
             ("FLOPs/token, training (Kaplan)", format_count(flops["training"]),
              "6·N + 6·L·s·a·d (Kaplan et al. 2020)"),
             ("  of which attention (Kaplan)", format_count(flops["attention"]), "")]
    mem = report["memory_bytes"]
    rows.append(("training memory", format_bytes(mem["total"]),
                 f"({cfg.dtype}, Adam, batch {cfg.batch_size} × {cfg.seq_len})"))
    rows += [(f"  {key}", format_bytes(mem[key]), "")
             for key in ("weights", "gradients", "optimizer", "activations")]
    rows.append(("KV cache", format_bytes(mem["kv_cache"]),
                 f"(inference, {cfg.dtype}, batch {cfg.batch_size} × {cfg.seq_len})"))
    rows.append(("  per token", f"{mem['kv_cache_per_token']:,} B", ""))
    return f"config: {source}\n" + "\n".join(_table(rows))


def _checked_out(path: str, flag: str) -> str:
    """``path`` if a file can be written there (checked before the work), else a UserError."""
    try:
        check_destination(path, flag)
    except FileProblem as exc:
        raise UserError(str(exc)) from None
    return path


def _write_error(path: str, exc: OSError) -> str:
    from .atomic import short_path

    return f"cannot write {short_path(path)}: {exc.strerror or exc}"


#: Bytes each parameter needs at least, per command: fp32 weights (attention); + gradients
#: (measure); + Adam's two moments (train).
BYTES_PER_PARAM = {"attention": 4, "measure": 8, "train": 16}


def _refuse_unbuildable(cfg: ModelConfig, command: str, device: str = "cpu") -> None:
    """Refuse a model whose weights alone (``BYTES_PER_PARAM`` × parameters) exceed every byte
    of memory this machine has (RAM + swap, or the GPU's memory): an allocation that can
    only fail, said in one line before it is tried. Whether it fits in what is *free* now is
    the memory budget's question (measure), not this one."""
    from .sizing import count_parameters

    params = count_parameters(cfg)["total"]
    need = BYTES_PER_PARAM[command] * params
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return
    have = psutil.virtual_memory().total + psutil.swap_memory().total
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            have = max(have, torch.cuda.get_device_properties(0).total_memory)
    if need > have:
        raise UserError(f"the model has {params:,} parameters: {command} needs at "
                        f"least {format_bytes(need)} for them, more than the "
                        f"{format_bytes(have)} of memory this machine has (vocab_size "
                        f"{cfg.vocab_size:,} × d_model {cfg.d_model:,}, {cfg.n_layers} layers)")


def cmd_positional(args: argparse.Namespace) -> str:
    """Write a positional encoding as .npy (see positional_views.export_array for shapes)."""
    import numpy as np

    from .atomic import atomic_open
    from .positional_views import ViewSpec, export_array, minilm_folder

    if args.kind != "learned" and args.model is not None:
        raise UserError(f"--model is only for --kind learned, not {args.kind}")
    _checked_out(args.out, "--out")
    folder = None if args.model in (None, "minilm") else args.model
    if args.kind == "learned" and folder is None:
        folder = minilm_folder()
    spec = ViewSpec(kind=args.kind, length=args.max_len, d_model=args.d_model,
                    n_heads=args.heads, base=args.base, buckets=args.buckets,
                    max_distance=args.max_distance, bidirectional=not args.causal)
    array = export_array(spec, folder)
    try:
        with atomic_open(args.out, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    except OSError as exc:
        raise UserError(_write_error(args.out, exc)) from None
    return f"wrote {args.out}: {args.kind}, shape {list(array.shape)}, {array.dtype}"


def _with_param(cfg: ModelConfig, param: str | None) -> ModelConfig:
    return cfg if param is None else cfg.replace(parametrization=param)


def _rows_text(rows) -> str:
    lines = [f"{'kind':<16} {'tensor':<36} {'rms':>11}  {'log2':>6}"]
    for r in rows:
        log2 = f"{number(math.log2(r.rms), '.1f'):>6}" if r.rms > 0 and math.isfinite(r.rms) \
            else "     -"
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

    cfg = _with_param(_load_config(args.config, "predict"), args.param)
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
    from .attention_views import checkpoint_attentions, configured_attentions, kv_group, kv_summary

    if (args.model is None) == (args.config is None):
        raise UserError("give exactly one of --model minilm|FOLDER and --config FILE")
    _checked_out(args.out, "--out")
    if args.config is not None:
        cfg = load(args.config, "attention")
        _refuse_unbuildable(cfg, "attention", cfg.device)
        result = configured_attentions(cfg, args.text)
    else:
        from . import pretrained

        loaded = pretrained.minilm() if args.model == "minilm" else \
            pretrained.load_checkpoint(args.model)
        result = checkpoint_attentions(loaded, args.text)
    arrays = {"attentions": result.attentions.astype(np.float32),
              "tokens": np.array(result.tokens, dtype=np.str_)}
    heads = result.attentions.shape[1] if result.attentions.ndim == 4 else 0
    if kv_group(0, heads, result.kv_heads) is not None:  # GQA: each query head's K/V head
        arrays["kv_head"] = np.array([kv_group(h, heads, result.kv_heads)
                                      for h in range(heads)], dtype=np.int64)
    if result.cross_attentions is not None:
        arrays["cross_attentions"] = result.cross_attentions.astype(np.float32)
        arrays["encoder_attentions"] = result.encoder_attentions.astype(np.float32)
    try:
        with atomic_open(args.out, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        raise UserError(_write_error(args.out, exc)) from None
    shape = list(result.attentions.shape)
    cut = f"; text cut by {result.truncated} tokens to fit" if result.truncated else ""
    groups = kv_summary(heads, result.kv_heads)
    groups = f"; {groups}, kv_head[h] in the file" if groups else ""
    return f"wrote {args.out}: attentions {shape} (layers, heads, query, key){groups}{cut}"


def cmd_measure(args: argparse.Namespace) -> str:
    """One forward+backward pass (or ``--seeds`` of them, combined by geometric mean); RMS
    of every tensor (same JSON shape as ``predict``; warnings: tensors that are not
    finite)."""
    from .measure import measure_seeds, measurement_budget
    from .memory_budget import MemoryBudgetError

    cfg = _with_param(_load_config(args.config, "measure"), args.param)
    if args.device is not None:
        cfg = cfg.replace(device=args.device)
    rows_given = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len))
                  if v is not None}
    if rows_given:
        cfg = cfg.replace(**rows_given)  # a bad value is the config's own one-line error
    _refuse_unbuildable(cfg, "measure", cfg.device)
    if not 1 <= args.seeds <= 64:
        raise UserError(f"--seeds: {args.seeds} is not between 1 and 64")
    if not args.ignore_memory_budget:
        budget = measurement_budget(cfg, args.seeds)
        if not budget.fits:
            raise MemoryBudgetError(budget)
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
    if args.checkpoint is not None:
        _checked_out(args.checkpoint, "--checkpoint")
    _refuse_unbuildable(cfg, "train", args.device or "cpu")
    device = resolve_device(args.device or "cpu")
    start = time.perf_counter()
    run = TrainingRun(cfg, settings, device)
    run.run(run.settings.steps)
    seconds = time.perf_counter() - start
    write_error = None
    if args.checkpoint is not None:
        try:
            run.save_checkpoint(args.checkpoint)
        except OSError as exc:  # the results are printed all the same (ResultsNotSaved)
            write_error = _write_error(args.checkpoint, exc)
    output = _train_output(args, run, seconds, saved=write_error is None)
    if write_error is not None:
        raise ResultsNotSaved(f"{write_error}; the results above are from the finished run",
                              output)
    if run.diverged is not None:  # the steps it made first, then why it stopped (exit 2)
        raise RunStopped(run.diverged, output)
    return output


def _train_output(args: argparse.Namespace, run, seconds: float, saved: bool) -> str:
    """``train``'s report: JSON, or a table of steps and a summary line."""
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
        line = (f"{r.step:>5} {number(r.loss, '.4f'):>9} {number(r.loss_scale, '.3g'):>8} "
                f"{'yes' if r.skipped else '':>4}")
        if r.kind_rms is not None and r.underflow is not None:
            line += (f"  {number(r.kind_rms['activation'], '.3g'):>9} "
                     f"{number(r.kind_rms['grad_activation'], '.3g'):>9}"
                     f"  {r.underflow['grad_activation']['fp8_e5m2']:>24.2%}"
                     f" {r.underflow['grad_weight']['fp8_e5m2']:>7.2%}")
        lines.append(line)
    lines.append(f"{run.step} steps in {seconds:.1f} s: {s.parametrization}, {s.dtype}, task "
                 f"{s.task}, lr {s.lr:g}, loss scaling {'on' if s.loss_scaling else 'off'}")
    if args.checkpoint is not None and saved:
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
                       help="a .json or .toml config, or a Hugging Face config.json or "
                            "model folder (default: built-in)")
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
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="override the config's batch size (fewer rows, less memory; the "
                        "gradients' RMS depends on the rows summed over)")
    p.add_argument("--seq-len", type=int, metavar="T", help="override the config's seq_len")
    p.add_argument("--ignore-memory-budget", action="store_true",
                   help="measure even when the estimated peak memory exceeds what is free")

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
    use_one_blas_thread()  # the predictor's small products: see unitscale_core.blas_threads
    try:
        out = func(args)
    except ResultsNotSaved as exc:  # the work is done: its results first, then why no file
        _print(exc.output)
        print(f"unitscale {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as exc:  # ConfigError and every user-caused error subclass ValueError
        print(f"unitscale {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError as exc:  # an allocation beyond what is free now (numpy, Python)
        detail = f": {_one_line(exc)}" if str(exc).strip() else ""
        print(f"unitscale {args.command}: error: out of memory{detail}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as exc:
        if not _is_allocation_failure(exc):
            raise
        print(f"unitscale {args.command}: error: out of memory: {_one_line(exc)}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    _print(out)
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (shortened: a message is a line, not a dump)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 500 else f"{line[:500]}… ({len(line):,} characters)"


def _is_allocation_failure(exc: RuntimeError) -> bool:
    """torch's failed allocations: ``torch.OutOfMemoryError`` (CUDA) or the CPU allocator's
    "can't allocate memory" RuntimeError."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "can't allocate memory" in text or "DefaultCPUAllocator" in text


def _print(out: str) -> None:
    try:
        print(out)
    except BrokenPipeError:  # `unitscale … | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    main_exit()
