"""Configuration loading: defaults, overrides and errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pouch import config as c


def test_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(c, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = c.load(None)
    assert cfg == c.Config()
    assert cfg.root == Path("/var/lib/pouch")
    assert cfg.state == Path("/run/pouch")
    assert cfg.grpc.address == Path("/run/pouch/pouch.sock")
    assert cfg.stream.address == "127.0.0.1"
    assert cfg.stream.port == 0
    assert cfg.log.level is c.LogLevel.INFO
    assert cfg.log.format is c.LogFormat.LOGFMT


def test_file_values_and_overrides(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text('root = "/srv/pouch"\nshutdown_grace_period = 3\n[log]\nformat = "json"\n')
    cfg = c.with_overrides(c.load(path), state=Path("/tmp/s"), socket=Path("/tmp/s.sock"))
    assert cfg.root == Path("/srv/pouch")
    assert cfg.shutdown_grace_period == 3.0
    assert cfg.log.format is c.LogFormat.JSON
    assert cfg.state == Path("/tmp/s")
    assert cfg.grpc.address == Path("/tmp/s.sock")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nope": 1}, "unknown key nope"),
        ({"log": {"colour": True}}, "unknown key log.colour"),
        ({"log": {"level": 3}}, "log.level"),
        ({"stream": {"port": True}}, "stream.port"),
        ({"root": ""}, "root"),
        ({"cgroup": "systemd"}, "invalid value for cgroup: expected a table"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(c.ConfigError, match=message.replace(".", r"\.")):
        c.from_dict(data)


def test_several_errors_are_all_reported():
    with pytest.raises(c.ConfigError) as err:
        c.from_dict({"a": 1, "log": {"level": "x", "b": 2}})
    text = str(err.value)
    assert "unknown key a" in text
    assert "log.level" in text
    assert "unknown key log.b" in text


def test_to_toml_round_trips():
    cfg = c.with_overrides(c.Config(), root=Path('/odd "path"'))
    assert c.from_dict(tomllib.loads(c.to_toml(cfg))) == cfg
