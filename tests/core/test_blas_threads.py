"""numpy's BLAS is held to one thread by the entry points (unitscale_core.blas_threads)."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from unitscale_core import blas_threads, cli
from unitscale_core.blas_threads import blas_thread_counts


@pytest.fixture
def restore_blas():
    before = max(blas_thread_counts() or {1})
    yield
    threadpool_limits(limits=before, user_api="blas")


@pytest.mark.parametrize("env,want", [(None, 1), ("1", 1), ("3", 3), ("0", None),
                                      ("many", 1)])
def test_use_one_blas_thread_limits_numpys_blas(monkeypatch, restore_blas, env, want):
    assert blas_thread_counts(), "numpy's BLAS is visible to threadpoolctl"
    if env is None:
        monkeypatch.delenv(blas_threads.ENV, raising=False)
    else:
        monkeypatch.setenv(blas_threads.ENV, env)
    threadpool_limits(limits=2, user_api="blas")
    assert blas_threads.use_one_blas_thread() == want
    assert blas_thread_counts() == {2 if want is None else want}


def test_the_cli_applies_it_before_its_command(monkeypatch, restore_blas, capsys):
    calls = []
    monkeypatch.setattr(cli, "use_one_blas_thread", lambda: calls.append(blas_thread_counts()))
    assert cli.main(["params"]) == 0
    assert calls, "unitscale's main calls use_one_blas_thread"
    assert "parameters" in capsys.readouterr().out.lower()
