"""Odd command lines, in process (``cli.main``): exit 0 or 2, one error line, no traceback.

A fixed list of hostile invocations (special files, huge and non-finite numbers, bad
destinations, impossible sizes) and hypothesis-drawn argument lists over the cheap commands
(``params``, ``predict``, ``seed-formula``, ``positional``): 95 + 120 invocations.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitscale_core.cli import main
from unitscale_core.config import ModelConfig, save


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    good = root / "good.json"
    save(ModelConfig(d_model=32, n_heads=2, d_ff=64, n_layers=1, vocab_size=64, max_len=16,
                     seq_len=8, batch_size=1, device="cpu"), good)
    (root / "bad.json").write_text('{"d_model": 1' + "0" * 400 + "}")
    (root / "long.json").write_text('{"architecture": "' + "x" * 100_000 + '"}')
    (root / "deep.json").write_text('{"n_layers": 100000}')
    (root / "empty.toml").write_text("")
    (root / "text.yaml").write_text("d_model: 8")
    (root / "folder.json").mkdir()
    (root / "zero.json").symlink_to("/dev/zero")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.json")
    else:  # pragma: no cover
        (root / "fifo.json").write_text("{}")
    (root / "plain").write_text("x")
    return {"good": str(good), "root": str(root), **{p.stem: str(p) for p in root.iterdir()}}


def _odd_invocations(f: dict[str, str]) -> list[list[str]]:
    root = f["root"]
    out = f"{root}/out.npy"
    cases = [
        [], ["--version"], ["--help"], ["nope"], ["params", "--nope"], ["params", "--help"],
        ["params", "--json"], ["predict", "--param", "bogus"], ["measure", "--seeds", "x"],
    ]
    for name in ("bad", "long", "deep", "empty", "text", "folder", "zero", "fifo", "plain"):
        cases.append(["params", "--config", f[name]])
    cases += [["params", "--config", f"{root}/missing.json"], ["params", "--config", ""],
              ["params", "--config", "x" * 5000 + ".json"], ["predict", "--config", f["zero"]],
              ["measure", "--config", f["fifo"]], ["train", "--config", f["long"]],
              ["attention", "--config", f["deep"], "--text", "x", "--out", f"{root}/a.npz"]]
    for target, alpha, beta in [("0", "1.2", "1e6"), ("-1", "1.2", "1"), ("1", "1", "1"),
                                ("nan", "2", "1"), ("inf", "2", "1"), ("1e308", "1e-308", "1e308"),
                                ("0.85", "1.2", "1e6"), ("1", "-2", "1"), ("1", "2", "-inf"),
                                ("1e-320", "1.0000001", "1")]:
        cases.append(["seed-formula", "--target", target, "--alpha", alpha, "--beta", beta])
    for kind in ("sinusoidal", "learned", "relative", "rope", "alibi"):
        for extra in (["--max-len", "0"], ["--max-len", "-5"], ["--max-len", "10" + "0" * 30],
                      ["--max-len", "4", "--d-model", "3"], ["--max-len", "4", "--heads", "0"],
                      ["--max-len", "4", "--base", "nan"], ["--max-len", "4", "--base", "1"],
                      ["--max-len", "4", "--buckets", "0", "--max-distance", "0"]):
            cases.append(["positional", "--kind", kind, *extra, "--out", out])
    cases += [["positional", "--kind", "rope", "--max-len", "4", "--out", root],
              ["positional", "--kind", "rope", "--max-len", "4", "--out", f"{root}/no/x.npy"],
              ["positional", "--kind", "rope", "--max-len", "4", "--out", f"{f['plain']}/x"],
              ["positional", "--kind", "learned", "--max-len", "4", "--model", f["plain"],
               "--out", out],
              ["positional", "--kind", "learned", "--max-len", "4", "--model", root,
               "--out", out],
              ["positional", "--kind", "alibi", "--max-len", "4", "--model", "minilm",
               "--out", out],
              ["attention", "--text", "x", "--out", f"{root}/a.npz"],
              ["attention", "--model", "minilm", "--config", f["good"], "--text", "x",
               "--out", f"{root}/a.npz"],
              ["attention", "--model", root, "--text", "x", "--out", f"{root}/a.npz"],
              ["attention", "--model", f["plain"], "--text", "x", "--out", f"{root}/a.npz"],
              ["measure", "--config", f["good"], "--seeds", "0"],
              ["measure", "--config", f["good"], "--seeds", "65"],
              ["measure", "--config", f["good"], "--seeds", "-1"],
              ["train", "--config", f["good"], "--steps", "0"],
              ["train", "--config", f["good"], "--steps", "-1"],
              ["train", "--config", f["good"], "--steps", "1", "--lr", "nan"],
              ["train", "--config", f["good"], "--steps", "1", "--lr", "-1"],
              ["train", "--config", f["good"], "--steps", "1", "--log-every", "0"],
              ["train", "--config", f["good"], "--steps", "1", "--seed", "-1"],
              ["train", "--config", f["good"], "--steps", "1", "--checkpoint", root]]
    return cases


def _check(capsys, argv: list[str]) -> None:
    code = main(argv)  # an exception escaping here fails the test: no traceback allowed
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2 and argv and argv[0] not in ("--help",):
        lines = [line for line in err.splitlines() if "note:" not in line]
        assert lines and len(lines[-1]) < 1000, (argv, err[:500])


def test_at_least_50_odd_invocations_exit_0_or_2(files, capsys):
    cases = _odd_invocations(files)
    assert len(cases) >= 50
    for argv in cases:
        _check(capsys, argv)


_tokens = st.sampled_from([
    "params", "predict", "seed-formula", "positional", "--config", "--json", "--param", "unit",
    "umup", "--kind", "alibi", "rope", "relative", "sinusoidal", "--max-len", "--d-model",
    "--heads", "--buckets", "--max-distance", "--base", "--causal", "--target", "--alpha",
    "--beta", "--out", "0", "1", "-1", "3", "7", "nan", "inf", "-inf", "1e309", "10" + "0" * 30,
    "", "é", "--", "-", "x" * 300,
])


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.lists(_tokens, max_size=9))
def test_drawn_argument_lists_exit_0_or_2(files, capsys, argv):
    # every --out goes to the throw-away folder; a bare --out gets the next token as its name
    fixed = []
    for token in argv:
        fixed.append(token)
        if token == "--out":
            fixed.append(str(Path(files["root"]) / "drawn.npy"))
    _check(capsys, fixed)
