"""The ``unitscale`` command line: JSON shape, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unitscale_core.cli import main
from unitscale_core.config import ModelConfig, save


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_params_json(capsys, tmp_path):
    path = tmp_path / "gpt2.json"
    save(ModelConfig(d_model=768, n_heads=12, d_ff=3072, n_layers=12, vocab_size=50257,
                     max_len=1024, seq_len=1024), path)
    code, out, err = run(capsys, "params", "--config", str(path), "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["total"] == 124_439_808
    assert set(data) >= {"total", "components", "flops_per_token", "memory_bytes"}
    assert sum(data["components"].values()) == data["total"]


def test_params_text(capsys):
    code, out, _ = run(capsys, "params")
    assert code == 0 and "parameters" in out and "KV cache" in out


def test_params_text_has_both_flops_conventions_palm_headline_and_moe_active(capsys):
    """Mixtral-8x7B's preset: PaLM's FLOPs (the headline) and Kaplan's, labelled, and the
    parameters a token uses; a dense model has no active row (it would repeat the total)."""
    from unitscale_core.presets import load_preset
    from unitscale_core.sizing import flops_per_token, format_count

    mixtral = str(Path(__file__).resolve().parents[2] / "resources/presets/mixtral-8x7b.json")
    code, out, _ = run(capsys, "params", "--config", mixtral)
    assert code == 0
    rows = {line[:40].strip(): line[40:].split() for line in out.splitlines()[1:]}
    assert rows["active per token"][0] == "12,879,925,248"
    flops = flops_per_token(load_preset("mixtral-8x7b"))
    for label, key in [("FLOPs/token, forward (PaLM, headline)", "forward_palm"),
                       ("FLOPs/token, training (PaLM, headline)", "training_palm"),
                       ("of which attention (PaLM)", "attention_palm"),
                       ("FLOPs/token, forward (Kaplan)", "forward"),
                       ("FLOPs/token, training (Kaplan)", "training"),
                       ("of which attention (Kaplan)", "attention")]:
        assert " ".join(rows[label][:2]) == format_count(flops[key]), label
    assert flops["attention_palm"] == 2 * flops["attention"]
    assert rows["per token"][0] == "262,144"  # 2 · 32 layers · 8 kv heads · 128 · 4 B (fp32)
    code, out, _ = run(capsys, "params", "--config", mixtral, "--json")
    data = json.loads(out)
    assert data["active"] == 12_879_925_248 and data["flops_per_token"]["headline"] == "palm"
    code, out, _ = run(capsys, "params")
    assert code == 0 and "active per token" not in out and "(PaLM, headline)" in out


@pytest.mark.parametrize(("content", "needle"), [
    ('{"d_model": 100, "n_heads": 12}', "d_model=100 is not divisible by n_heads=12"),
    ('{"d_modle": 1}', "unknown key 'd_modle'"),
    ('{"d_model": ', "not valid JSON"),
])
def test_user_errors_are_one_line_exit_2(capsys, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run(capsys, "params", "--config", str(path))
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_flag_exits_2(capsys):
    assert main(["params", "--nope"]) == 2


def test_console_script_runs_as_a_process(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("seq_len = 4096\n")
    proc = subprocess.run([sys.executable, "-m", "unitscale_core.cli", "params", "--config",
                           str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("unitscale params: error: seq_len=4096 is above max_len=512")


def test_positional_alibi_npy(capsys, tmp_path):
    out = tmp_path / "alibi.npy"
    code, stdout, _ = run(capsys, "positional", "--kind", "alibi", "--max-len", "32",
                          "--heads", "8", "--out", str(out))
    assert code == 0 and "[8, 32, 32]" in stdout
    bias = np.load(out, allow_pickle=False)
    assert bias.shape == (8, 32, 32)
    assert bias[0, 0, 5] == pytest.approx(-0.5 * 5)  # slope 1/2 for head 0 of 8


def test_positional_relative_matches_transformers(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    out = tmp_path / "rel.npy"
    assert main(["positional", "--kind", "relative", "--max-len", "40", "--buckets", "16",
                 "--max-distance", "20", "--out", str(out)]) == 0
    rel = torch.arange(40)[None, :] - torch.arange(40)[:, None]
    want = t5.T5Attention._relative_position_bucket(rel, True, 16, 20).numpy()
    np.testing.assert_array_equal(np.load(out), want)


def test_positional_learned_from_checkpoint(capsys, tmp_path):
    from safetensors.numpy import save_file

    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    save_file({"transformer.wpe.weight": table}, str(tmp_path / "model.safetensors"))
    out = tmp_path / "pos.npy"
    assert main(["positional", "--kind", "learned", "--max-len", "4", "--model", str(tmp_path),
                 "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), table[:4])


@pytest.mark.parametrize(("argv", "needle"), [
    (["--kind", "rope", "--max-len", "8", "--d-model", "7"], "d_model=7 must be even"),
    (["--kind", "sinusoidal", "--max-len", "0"], "max_len=0"),
    (["--kind", "learned", "--max-len", "600"], "above the checkpoint's 512 positions"),
    (["--kind", "alibi", "--max-len", "8", "--model", "minilm"], "--model is only for"),
])
def test_positional_user_errors(capsys, tmp_path, argv, needle):
    out = tmp_path / "x.npy"
    code, stdout, err = run(capsys, "positional", *argv, "--out", str(out))
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not out.exists()  # nothing partially written


def test_pickle_only_folder_is_refused_without_opening_it(capsys, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle, and never unpickled")
    code, _, err = run(capsys, "positional", "--kind", "learned", "--max-len", "4", "--model",
                       str(tmp_path), "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "only safetensors" in err


def test_predict_json_matches_measure_names(capsys, tmp_path):
    path = tmp_path / "m.json"
    save(ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=50, seq_len=8,
                     max_len=8, batch_size=2), path)
    code, out, _ = run(capsys, "predict", "--config", str(path), "--param", "unit", "--json")
    assert code == 0
    predicted = json.loads(out)
    assert predicted["parametrization"] == "unit"
    code, out, _ = run(capsys, "measure", "--config", str(path), "--param", "unit", "--json")
    measured = json.loads(out)
    assert set(predicted) == set(measured)  # the same JSON shape
    key = lambda t: (t["name"], t["kind"])  # noqa: E731
    assert {key(t) for t in predicted["tensors"]} == {key(t) for t in measured["tensors"]}
    row = predicted["tensors"][0]
    assert set(row["formats"]) == {"fp8_e4m3", "fp8_e5m2", "fp16", "bf16"}
    assert set(row["formats"]["fp16"]) >= {"underflow", "overflow", "headroom_max_log2",
                                           "headroom_min_log2"}


def test_predict_warns_where_tokens_collapse(capsys, tmp_path):
    """A 32-layer unit-scaled stack: the JSON's warnings name the LayerNorm the predictor
    finds (:func:`stream_collapse`), and the text ends with the same line; u-μP: none."""
    from unitscale_core.scaling.predict import stream_collapse

    cfg = ModelConfig(d_model=64, n_heads=2, d_ff=256, n_layers=32, vocab_size=500,
                      seq_len=32, max_len=32, batch_size=2, parametrization="unit")
    path = tmp_path / "deep.json"
    save(cfg, path)
    code, out, _ = run(capsys, "predict", "--config", str(path), "--json")
    want = stream_collapse(cfg).describe()
    assert code == 0 and json.loads(out)["warnings"] == [want]
    code, out, _ = run(capsys, "predict", "--config", str(path))
    assert out.rstrip().endswith(f"warning: {want}")
    code, out, _ = run(capsys, "predict", "--config", str(path), "--param", "umup", "--json")
    assert json.loads(out)["warnings"] == []


def test_seed_formula_example_and_errors(capsys):
    code, out, _ = run(capsys, "seed-formula", "--target", "0.85", "--alpha", "1.2", "--beta",
                       "1e6", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["d_e"] == pytest.approx(-0.8914, abs=1e-4)
    assert data["parameters"] == pytest.approx(-8.914e5, rel=1e-3)
    assert "negative" in data["warning"]
    code, out, _ = run(capsys, "seed-formula", "--target", "2", "--alpha", "1.5", "--beta", "10",
                       "--json")
    assert json.loads(out)["warning"] == ""
    code, out, err = run(capsys, "seed-formula", "--target", "0", "--alpha", "1", "--beta", "1")
    assert code == 2 and "target" in err and "alpha" in err and err.count("\n") == 1


def test_measure_over_seeds(capsys, tmp_path):
    from unitscale_core.measure import measure_seeds

    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=50, seq_len=8,
                      max_len=8, batch_size=2)
    path = tmp_path / "m.json"
    save(cfg, path)
    code, out, _ = run(capsys, "measure", "--config", str(path), "--seeds", "2", "--json")
    assert code == 0
    got = {(t["name"], t["kind"]): t["rms"] for t in json.loads(out)["tensors"]}
    assert got == {(r.name, r.kind): r.rms for r in measure_seeds(cfg, 2)}
    code, _, err = run(capsys, "measure", "--config", str(path), "--seeds", "0")
    assert code == 2 and "--seeds" in err and err.count("\n") == 1
