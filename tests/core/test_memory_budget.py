"""The memory budget of a measurement (issue 19): its estimate, the refusal, the smaller batch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unitscale_core import ModelConfig
from unitscale_core import memory_budget as MB
from unitscale_core.cli import main
from unitscale_core.sizing import activation_bytes, count_parameters

GPT2 = dict(architecture="decoder", d_model=768, n_heads=12, d_ff=3072, n_layers=12,
            vocab_size=50257, max_len=1024, seq_len=1024, batch_size=8, positional="learned",
            attention="causal", tie_embeddings=True, device="cpu")
SMALL = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, max_len=8, seq_len=8,
             batch_size=2, device="cpu")
GIB = 2**30


def fake_free(monkeypatch, available: int, total: int = 64 * GIB) -> None:
    """Make psutil say ``available`` bytes of host RAM are free."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=available, total=total))


def test_estimate_is_sizing_plus_the_loss_buffers_and_workspace():
    cfg = ModelConfig(**GPT2)
    mem = MB.measurement_memory(cfg)
    n = count_parameters(cfg)["total"]
    assert mem.weights == mem.gradients == 4 * n
    assert mem.activations == activation_bytes(cfg)
    assert mem.loss_buffers == 2 * 4 * 1024 * 8 * 50257  # two fp32 (b, s, V) gradients
    assert mem.total == 8 * n + activation_bytes(cfg) + mem.loss_buffers + mem.workspace
    assert mem.needed == mem.total
    # weights held by a cached model are not needed again; a second seed keeps one more model
    assert MB.measurement_memory(cfg, resident=True).needed == mem.total - 4 * n
    assert MB.measurement_memory(cfg, seeds=2).total == mem.total + 4 * n
    # FP8 is simulated on fp32 storage
    assert MB.measurement_memory(cfg.replace(dtype="fp8_e4m3")).total == mem.total


def test_host_ram_is_read_through_psutil(monkeypatch):
    fake_free(monkeypatch, 5 * GIB)
    assert MB.available_memory("cpu") == (5 * GIB, "host RAM")


def test_over_budget_names_both_numbers_and_a_smaller_batch_that_fits(monkeypatch):
    fake_free(monkeypatch, 6 * GIB)
    cfg = ModelConfig(**GPT2)
    budget = MB.check_budget(cfg, "cpu")
    assert not budget.fits and budget.available == 6 * GIB and budget.where == "host RAM"
    smaller = budget.smaller
    assert smaller is not None and smaller.seq_len == 1024  # the batch is halved first
    assert MB.fits(smaller, 6 * GIB) and not MB.fits(smaller.replace(
        batch_size=smaller.batch_size * 2), 6 * GIB)
    message = str(MB.MemoryBudgetError(budget))
    assert "14.6 GiB" in message and "6 GiB of host RAM is free" in message
    assert f"--batch-size {smaller.batch_size}" in message and "--ignore-memory-budget" in message
    assert "\n" not in message


def test_the_sequence_is_halved_once_the_batch_is_one():
    cfg = ModelConfig(**GPT2)
    free = int(MB.measurement_memory(cfg.replace(batch_size=1, seq_len=256)).total / 0.85)
    smaller = MB.smaller_measurement(cfg, free)
    assert (smaller.batch_size, smaller.seq_len) == (1, 256)
    assert "--batch-size 1 --seq-len 256" in str(MB.MemoryBudgetError(
        MB.check_budget(cfg, available=free)))


def test_nothing_fits_when_the_weights_alone_are_too_many():
    cfg = ModelConfig(**GPT2)
    budget = MB.check_budget(cfg, available=GIB // 2)
    assert budget.smaller is None
    assert "even batch 1 × sequence 1 would not fit" in str(MB.MemoryBudgetError(budget))


def test_a_run_that_fits_is_left_alone(monkeypatch):
    fake_free(monkeypatch, 64 * GIB)
    budget = MB.check_budget(ModelConfig(**GPT2), "cpu")
    assert budget.fits and budget.smaller is None


def test_measurement_budget_knows_a_cached_model(monkeypatch):
    """A model the cache holds already needs no new weights."""
    import torch

    from unitscale_core import measure as M

    cfg = ModelConfig(**SMALL)
    M._models.clear()
    cold = M.measurement_budget(cfg, available=GIB)
    M.cached_model(cfg, torch.device("cpu"))
    warm = M.measurement_budget(cfg, available=GIB)
    assert cold.memory.resident == 0 and warm.memory.resident == cold.memory.weights
    assert warm.needed == cold.needed - cold.memory.weights


def test_changed_rows_are_the_ones_the_predictor_moves():
    """Standard: halving the batch moves the gradients (the loss averages over the rows),
    never an activation or a weight; a shorter sequence also moves attention."""
    cfg = ModelConfig(**{**SMALL, "seq_len": 8, "batch_size": 4})
    by_kind = MB.count_by_kind(MB.changed_rows(cfg, cfg.replace(batch_size=2)))
    assert set(by_kind) <= {"grad_activation", "grad_weight"} and by_kind.get("grad_weight")
    shorter = MB.count_by_kind(MB.changed_rows(cfg, cfg.replace(seq_len=4)))
    assert shorter.get("activation")
    assert MB.changed_rows(cfg, cfg) == []
    assert MB.describe_changed({"grad_activation": 3, "grad_weight": 5}) == \
        "3 activation gradients and 5 weight gradients"
    assert MB.describe_changed({}) == "no tensor"


# -- the CLI -------------------------------------------------------------------------------------

#: Activations dominate (the gap between batch 4 and 8 is ~5 MiB, the weights ~0.1 MiB).
CLI_CFG = {**SMALL, "vocab_size": 512, "max_len": 64, "seq_len": 64, "batch_size": 8}


def between_batch_4_and_8() -> int:
    """Free bytes in which batch 4 fits and batch 8 does not."""
    cfg = ModelConfig(**CLI_CFG)
    need4 = MB.measurement_memory(cfg.replace(batch_size=4)).needed
    need8 = MB.measurement_memory(cfg).needed
    assert need8 - need4 > 2**20
    return int((need4 + need8) / 2 / MB.BUDGET_SHARE)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(CLI_CFG))
    return str(path)


def test_cli_refuses_in_one_line_naming_both_numbers_and_the_flag(monkeypatch, capsys,
                                                                   small_file):
    fake_free(monkeypatch, between_batch_4_and_8())
    assert main(["measure", "--config", small_file]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unitscale measure: error: ")
    assert "needs about" in err and "of host RAM is free" in err
    assert "--batch-size 4 would fit" in err and "--ignore-memory-budget" in err


def test_cli_measures_with_the_flag_that_reduces_the_batch_or_the_override(
        monkeypatch, capsys, small_file):
    fake_free(monkeypatch, between_batch_4_and_8())
    assert main(["measure", "--config", small_file, "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["batch_size"] == 4 and out["tensors"]
    assert main(["measure", "--config", small_file, "--ignore-memory-budget", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["batch_size"] == 8


def test_cli_bad_batch_is_one_line(capsys, small_file):
    assert main(["measure", "--config", small_file, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size" in err
