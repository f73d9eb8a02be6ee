"""The trainer: determinism, learning, FP8 simulation, statistics, checkpoints, CLI, u-μP LRs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import unit_scaling as uu
from safetensors import safe_open
from safetensors.torch import save_file

from unitscale_core import ModelConfig, build_model
from unitscale_core.cli import main
from unitscale_core.config import dumps_json
from unitscale_core.measure import measure
from unitscale_core.model.ops import make_ops
from unitscale_core.scaling.formats import FORMATS
from unitscale_core.tasks import SEPARATOR, batch_rng, make_batch, toy_length
from unitscale_core.tensors import KINDS
from unitscale_core.training import (
    UNDERFLOW_FORMATS,
    StepRecord,
    TrainingError,
    TrainingRun,
    TrainSettings,
    _Reducer,
    train,
    underflow_counts,
)

SMALL = dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, vocab_size=256, max_len=64,
             seq_len=16, batch_size=4)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def losses(cfg: ModelConfig, steps: int, **settings) -> list[float]:
    run = TrainingRun(cfg, TrainSettings(steps=steps, log_every=1000, **settings))
    run.run(steps)
    return run.losses


def test_same_seed_same_losses_other_seed_other_losses():
    cfg = small(dropout=0.1)  # dropout masks must be seeded too
    a = losses(cfg, 3, parametrization="unit", dtype="fp8_e4m3")
    b = losses(cfg, 3, parametrization="unit", dtype="fp8_e4m3")
    c = losses(cfg, 3, parametrization="unit", dtype="fp8_e4m3", seed=1)
    assert a == b  # bit-identical
    assert a != c and all(math.isfinite(x) for x in a + c)


@pytest.mark.parametrize("param", ["standard", "unit", "umup"])
def test_short_run_loss_decreases(param):
    """15 steps of the copy task: the mean loss of the last 3 steps is at least 0.3 nats below
    that of the first 3 (the model first learns the symbols' distribution)."""
    cfg = small(seq_len=32)
    run = TrainingRun(cfg, TrainSettings(parametrization=param, task="copy", steps=15,
                                         log_every=1000))
    run.run(15)
    first, last = np.mean(run.losses[:3]), np.mean(run.losses[-3:])
    assert last < first - 0.3, (param, first, last)


def test_fp8_rounding_changes_unrepresentable_values_and_the_run():
    ops = make_ops("unit", "fp8_e4m3")
    x = torch.tensor([1.0, 1.0 + 2**-5, 300.0], requires_grad=True)  # E4M3 steps 1/8 at 1
    y = ops.q(x)
    assert y.tolist() == [1.0, 1.0, 288.0]  # 1.03125 → 1, 300 → 288 (spacing 32 at 256)
    y.backward(torch.tensor([1e-6, 2**-16, 1.0]))  # E5M2 grads: 1e-6 < 2^-17 → 0
    assert x.grad.tolist() == [0.0, 2**-16, 1.0]
    cfg = small()
    assert losses(cfg, 3, parametrization="unit", dtype="fp8_e4m3") != \
        losses(cfg, 3, parametrization="unit", dtype="fp32")


def test_underflow_fractions_match_casting_to_each_format():
    """Counts of nonzero values that become 0 when actually cast with torch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen) * torch.logspace(-12, 2, 50_000, base=2.0)
    edges = torch.tensor([FORMATS[f].underflow_threshold for f in UNDERFLOW_FORMATS])
    x = torch.cat([x, torch.zeros(100), edges, -edges, edges * 1.0001, torch.tensor([1e-44])])
    sums = _Reducer(torch.device("cpu"))(x).numpy()
    rms, under = underflow_counts(sums, x.numel())
    assert rms == pytest.approx(float(x.double().pow(2).mean().sqrt()), rel=1e-5)
    nonzero = x != 0
    for fmt in UNDERFLOW_FORMATS:
        cast = x.to(FORMATS[fmt].torch_dtype()).float()
        want = int((nonzero & (cast == 0)).sum()) / int(nonzero.sum())
        assert under[fmt] == pytest.approx(want, abs=0), fmt
    assert 0 < under["fp16"] < under["fp8_e5m2"] < under["fp8_e4m3"] < 1


def test_logged_statistics_use_measure_names_and_the_initial_weights():
    cfg = small()
    run = TrainingRun(cfg, TrainSettings(parametrization="standard", steps=2))
    rows = measure(cfg.replace(parametrization="standard"))
    assert list(zip(run.tensor_names, run.tensor_kinds)) == [(r.name, r.kind) for r in rows]
    (rec,) = run.run(1)
    assert set(rec.kind_rms) == set(KINDS) and set(rec.underflow["weight"]) == \
        set(UNDERFLOW_FORMATS)
    init = dict(build_model(cfg).named_parameters())  # step 1 ran on the initial weights
    values = torch.cat([p.detach().flatten() for p in init.values()])
    assert rec.kind_rms["weight"] == pytest.approx(float(values.pow(2).mean().sqrt()), rel=1e-5)
    for i, (name, kind) in enumerate(zip(run.tensor_names, run.tensor_kinds)):
        if kind == "weight":
            want = float(init[name].detach().pow(2).mean().sqrt())
            assert rec.tensor_rms[i] == pytest.approx(want, rel=1e-5), name
    assert rec.tensor_rms.dtype == np.float32 and np.isfinite(rec.tensor_rms).all()
    e5m2 = FORMATS["fp8_e5m2"].torch_dtype()
    grads = torch.cat([p.grad.flatten() for p in run.model.parameters()])
    cast_zero = (grads != 0) & (grads.to(e5m2).float() == 0)
    # the gradients left in .grad are step 1's: the recorded fraction is theirs
    assert rec.underflow["grad_weight"]["fp8_e5m2"] == pytest.approx(
        int(cast_zero.sum()) / int((grads != 0).sum()))


def test_standard_fp8_gradients_underflow_more_than_unit():
    """The effect the lab exists to show, at step 1: E5M2 loses a larger share of the
    standard model's activation gradients than of the unit-scaled model's."""
    cfg = small(d_model=64, n_heads=4, d_ff=256, seq_len=32, batch_size=8)
    frac = {}
    for param in ("standard", "unit"):
        run = TrainingRun(cfg, TrainSettings(parametrization=param, dtype="fp32", steps=1))
        (rec,) = run.run(1)
        frac[param] = rec.underflow["grad_activation"]["fp8_e5m2"]
    assert frac["standard"] > 10 * frac["unit"]


@pytest.mark.parametrize("setup", [
    dict(parametrization="standard", dtype="fp32"),
    dict(parametrization="umup", dtype="fp16", loss_scaling=True, task="sort"),
])
def test_checkpoint_round_trip_continues_identically(tmp_path, setup):
    cfg = small(dropout=0.1)
    settings = TrainSettings(steps=6, log_every=2, **setup)
    whole = TrainingRun(cfg, settings)
    whole.run(6)
    part = TrainingRun(cfg, settings)
    part.run(3)
    path = tmp_path / "run.safetensors"
    part.save_checkpoint(str(path))
    resumed = TrainingRun.load_checkpoint(str(path))
    assert resumed.step == 3 and resumed.settings == whole.settings
    resumed.run(10)  # stops at settings.steps
    assert resumed.losses == whole.losses
    assert [r.loss_scale for r in resumed.records] == [r.loss_scale for r in whole.records]
    np.testing.assert_array_equal(resumed.records[1].tensor_rms, whole.records[1].tensor_rms)
    for (n, a), (_, b) in zip(resumed._master_named, whole._master_named):
        assert torch.equal(a, b), n


def _rewrite(src, dst, change):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_malformed_checkpoints_are_refused_by_name(tmp_path):
    run = TrainingRun(small(), TrainSettings(steps=2))
    run.run(1)
    good = tmp_path / "good.safetensors"
    run.save_checkpoint(str(good))
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TrainingError, match="truncated.safetensors.*safetensors"):
        TrainingRun.load_checkpoint(str(truncated))

    shape = tmp_path / "shape.safetensors"
    _rewrite(good, shape, lambda t: t.update({"param/layers.0.attn.q.weight": torch.zeros(3, 3)}))
    with pytest.raises(TrainingError, match=r"param/layers\.0\.attn\.q\.weight.*shape"):
        TrainingRun.load_checkpoint(str(shape))

    missing = tmp_path / "missing.safetensors"
    _rewrite(good, missing, lambda t: t.pop("adam/head.weight/exp_avg", None)
             or t.pop("adam/tok_emb.weight/exp_avg"))
    with pytest.raises(TrainingError, match="missing tensor 'adam/"):
        TrainingRun.load_checkpoint(str(missing))

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(TrainingError, match="metadata"):
        TrainingRun.load_checkpoint(str(plain))
    with pytest.raises(TrainingError, match="cannot read"):
        TrainingRun.load_checkpoint(str(tmp_path / "absent.safetensors"))


def test_settings_and_config_errors_name_their_fields():
    with pytest.raises(TrainingError) as err:
        TrainSettings(steps=0, lr=-1.0, task="poetry", dtype="fp4", log_every=1.5).validate()
    assert set(err.value.errors) == {"steps", "lr", "task", "dtype", "log_every"}
    assert "steps=0" in str(err.value) and "task='poetry'" in str(err.value)
    with pytest.raises(TrainingError, match="vocab_size=100") as err:
        TrainingRun(small(vocab_size=100), TrainSettings(task="lm"))
    assert set(err.value.errors) == {"vocab_size"}
    TrainingRun(small(vocab_size=100), TrainSettings(task="sort", steps=1))  # 17 tokens suffice
    with pytest.raises(TrainingError, match="seq_len=3"):
        TrainingRun(small(seq_len=3), TrainSettings(task="copy"))


def test_toy_batches_hold_their_answers():
    rng = batch_rng(0, 1)
    b = make_batch("sort", "decoder", 40, 3, rng)
    n = toy_length("decoder", 40)
    x = b.inputs[:, :n]
    assert (b.inputs[:, n] == SEPARATOR).all() and b.answer_from == n
    np.testing.assert_array_equal(b.targets[:, n:], np.sort(x, axis=1))
    b = make_batch("reverse", "encoder-decoder", 40, 3, batch_rng(0, 2))
    np.testing.assert_array_equal(b.targets, b.src[:, ::-1])
    m = make_batch("lm", "encoder", 40, 3, batch_rng(0, 3))
    assert m.loss_mask.any(axis=1).all() and (m.inputs[m.loss_mask] == 0).all()


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder", "encoder"])
def test_attention_maps_of_the_probe(arch):
    run = TrainingRun(small(architecture=arch), TrainSettings(task="reverse", steps=1))
    run.run(1)
    maps, labels = run.attention()
    layers = 2
    t = len(labels)
    assert maps.shape == (layers, 2, t, t) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    if arch != "encoder":  # decoder self-attention is causal
        assert np.allclose(np.triu(maps, k=1), 0.0)
    assert run.model.training  # the probe leaves training mode as it was


def test_train_reports_progress_and_stops_when_cancelled():
    seen = []
    run = train(small(), TrainSettings(steps=3, log_every=2),
                progress=lambda f, text: seen.append((f, text)))
    assert [f for f, _ in seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and run.done
    assert [r.kind_rms is not None for r in run.records] == [True, True, True]  # 1, 2, last

    class Stop(Exception):
        pass

    calls = iter([None] * 6 + [Stop()])  # before, inside (2) each step: raise before step 3

    def check():
        exc = next(calls)
        if exc is not None:
            raise exc

    run = TrainingRun(small(), TrainSettings(steps=5))
    with pytest.raises(Stop):
        run.run(5, check)
    assert run.step == 2 and len(run.records) == 2 and isinstance(run.records[0], StepRecord)


def test_umup_learning_rates_agree_with_unit_scaling():
    """Our parameters get the LRs unit_scaling's own u-μP modules give theirs."""
    eta = 0.7
    cfg = small(parametrization="umup", tie_embeddings=False, bias=False,
                activation="swiglu", d_ff=128, positional="none")
    ours = TrainingRun(cfg, TrainSettings(lr=eta, steps=1)).lrs
    lib = uu.TransformerDecoder(hidden_size=32, vocab_size=256, layers=2, heads=2)
    names = {id(p): n for n, p in lib.named_parameters()}
    theirs = {names[id(p)]: g["lr"] for g in uu.optim.AdamW(lib.parameters(), lr=eta)
              .param_groups for p in g["params"]}
    pairs = {"tok_emb.weight": "embedding.weight", "head.weight": "projection.weight"}
    for i in range(2):
        for ours_name in ("attn.q", "attn.k", "attn.v"):
            pairs[f"layers.{i}.{ours_name}.weight"] = f"layers.{i}.mhsa.linear_qkv.weight"
        pairs[f"layers.{i}.attn.o.weight"] = f"layers.{i}.mhsa.linear_o.weight"
        pairs[f"layers.{i}.ffn.up.weight"] = f"layers.{i}.mlp.linear_1.weight"
        pairs[f"layers.{i}.ffn.gate.weight"] = f"layers.{i}.mlp.linear_gate.weight"
        pairs[f"layers.{i}.ffn.down.weight"] = f"layers.{i}.mlp.linear_2.weight"
    for mine, lib_name in pairs.items():
        assert ours[mine] == pytest.approx(theirs[lib_name]), mine
    # norm gains inside the stack: η·L^-½ (the library's rule for mup_type "norm")
    assert ours["layers.1.norm2.weight"] == pytest.approx(eta / math.sqrt(2))
    assert ours["norm.weight"] == pytest.approx(eta)
    standard = TrainingRun(small(), TrainSettings(lr=0.01, steps=1)).lrs
    assert set(standard.values()) == {0.01}


def test_cli_train_json_and_user_errors(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(dumps_json(small()))
    ckpt = tmp_path / "out.safetensors"
    code = main(["train", "--config", str(cfg_file), "--steps", "3", "--log-every", "2",
                 "--param", "unit", "--dtype", "fp8_e4m3", "--task", "copy", "--json",
                 "--checkpoint", str(ckpt)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"config", "settings", "loss", "logged", "seconds"}
    assert len(out["loss"]) == 3 and out["settings"]["dtype"] == "fp8_e4m3"
    assert [e["step"] for e in out["logged"]] == [1, 2, 3]
    assert set(out["logged"][0]["underflow"]["grad_activation"]) == set(UNDERFLOW_FORMATS)
    assert out["config"]["parametrization"] == "unit"
    assert TrainingRun.load_checkpoint(str(ckpt)).losses == out["loss"]

    assert main(["train", "--config", str(cfg_file), "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "loss" in text.splitlines()[0] and "1 steps in" in text

    assert main(["train", "--config", str(cfg_file), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps=0" in err
    (tmp_path / "v.json").write_text(dumps_json(small(vocab_size=64)))
    assert main(["train", "--config", str(tmp_path / "v.json")]) == 2
    assert "vocab_size=64" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_and_says_why(tmp_path):
    """Issue 20 #12: a learning rate of 1e30 trained to NaN with no warning."""
    run = TrainingRun(small(), TrainSettings(steps=20, lr=1e30, log_every=1000))
    before = {n: p.detach().clone() for n, p in run._master_named}
    new = run.run(20)
    assert run.done and run.step == len(new) < 20
    assert all(math.isfinite(r.loss) for r in new[:-1]) and not math.isfinite(new[-1].loss)
    assert new[-1].skipped  # the update of the NaN step is not applied
    msg = run.diverged
    assert msg.startswith(f"loss became NaN at step {run.step} after ")
    assert "learning rate 1e+30 is too large" in msg and "default for standard is 0.001" in msg
    assert run.run(5) == [] and run.step == len(new)  # stays stopped
    assert any(not torch.equal(before[n], p) for n, p in run._master_named)  # it did train
    assert all(torch.isfinite(p).all() for _, p in run._master_named)
    # the stop survives a checkpoint
    run.save_checkpoint(str(tmp_path / "d.safetensors"))
    again = TrainingRun.load_checkpoint(str(tmp_path / "d.safetensors"))
    assert again.done and again.diverged == msg

    # loss scaling cannot mend a non-finite loss either: it stops instead of skipping forever
    scaled = TrainingRun(small(), TrainSettings(steps=20, lr=1e30, dtype="fp16",
                                                loss_scaling=True, log_every=1000))
    scaled.run(20)
    assert scaled.done and scaled.step < 20 and "is too large" in scaled.diverged
    # a sane run is untouched
    fine = TrainingRun(small(), TrainSettings(steps=3, log_every=1000))
    fine.run(3)
    assert fine.diverged is None and fine.step == 3


def test_cli_train_prints_the_steps_then_why_it_stopped(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(dumps_json(small()))
    assert main(["train", "--config", str(cfg_file), "--steps", "20", "--lr", "1e30"]) == 2
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()[1:] if "steps in" not in line]
    assert rows[-1][1] == "nan" and len(rows) < 20
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"unitscale train: error: loss became NaN at step {len(rows)} ")
    assert "learning rate 1e+30 is too large" in err


def test_a_cancel_inside_a_step_leaves_the_run_as_before_the_step():
    """Stop need not wait for a whole step: the check also runs after the forward and after
    the backward pass, and a cancel there changes nothing (the continuation is identical)."""
    class Stop(Exception):
        pass

    for fail_at in (2, 3):  # after the forward pass, after the backward pass
        run = TrainingRun(small(dropout=0.1), TrainSettings(steps=4, log_every=1))
        run.run(1)
        def check(calls=[], fail_at=fail_at):  # noqa: B006 - one list per loop turn
            calls.append(1)
            if len(calls) == fail_at:
                raise Stop

        with pytest.raises(Stop):
            run.run(1, check)
        assert run.step == 1 and len(run.records) == 1
        run.run(3)
        ref = TrainingRun(small(dropout=0.1), TrainSettings(steps=4, log_every=1))
        ref.run(4)
        assert run.losses == ref.losses
