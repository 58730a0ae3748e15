"""`make demo`'s data step: MINI_MIAS_DIR when it holds mini-MIAS, else a verified fetch that fails loudly."""

from __future__ import annotations

import socket

import pytest
from rich.console import Console

from simulations import demo


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mini_mias_dir_is_used_when_it_holds_mini_mias(mias_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MINI_MIAS_DIR", str(mias_dir))
    monkeypatch.setattr(demo, "DEFAULT_DATA", tmp_path / "never")
    assert demo.data_folder(Console(file=open("/dev/null", "w"))) == mias_dir.resolve()
    assert not (tmp_path / "never").exists()


def test_without_data_the_demo_fetches_and_exits_2_when_it_cannot(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINI_MIAS_DIR", str(tmp_path / "missing"))
    monkeypatch.setenv("MINI_MIAS_URL", f"http://127.0.0.1:{_closed_port()}/all-mias.tar.gz")
    monkeypatch.setattr(demo, "DEFAULT_DATA", tmp_path / "data" / "mini-mias")
    code = demo.main(["--no-live", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 2
    assert f"MINI_MIAS_DIR={tmp_path / 'missing'} holds no mini-MIAS" in out.replace("\n", "")
    assert "cannot obtain mini-MIAS" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "data" / "mini-mias").exists()


def test_a_bad_override_exits_2_before_anything_runs(tmp_path, capsys):
    assert demo.main(["--no-live", "--set", "noise-multiplyer=3", "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'noise-multiplyer' (did you mean 'noise-multiplier'?)" in capsys.readouterr().out.replace(
        "\n", "")
    assert not (tmp_path / "run").exists()


def test_help_lists_the_overrides(capsys):
    with pytest.raises(SystemExit) as caught:
        demo.main(["--help"])
    assert caught.value.code == 0
    assert "--set KEY=VALUE" in capsys.readouterr().out
