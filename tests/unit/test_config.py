"""Config: TOML file, then MOED_* environment variables, then flags; bad values name themselves."""

from __future__ import annotations

import dataclasses

import pytest

from daemon.config import Config, load_config, parse_duration, split_host_port
from daemon.errors import MoedError


def test_precedence_file_then_env_then_flags(tmp_path):
    f = tmp_path / "moed.toml"
    f.write_text('model = "/models/a"\nmax_batch = 4\nkeep_alive = "10m"\ngrace_period = 5\nwarmup = false\n')
    cfg = load_config(f, env={"MOED_MAX_BATCH": "6", "MOED_SOCKET": "/run/x.sock"}, flags={"model": "/models/b",
                                                                                         "socket": None})
    assert cfg.model == "/models/b"  # flag beats file
    assert cfg.max_batch == 6  # env beats file
    assert cfg.socket == "/run/x.sock"  # unset flag leaves env
    assert cfg.keep_alive == 600.0 and cfg.grace_period == 5.0 and cfg.warmup is False


def test_moed_config_variable_names_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("max_queue = 3\n")
    assert load_config(None, env={"MOED_CONFIG": str(f)}).max_queue == 3


def test_defaults_without_any_source():
    assert load_config(None, env={}, flags={}) == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().max_batch = 3


@pytest.mark.parametrize("text,needle", [
    ("max_batchh = 3\n", "unknown setting 'max_batchh'"),
    ('max_batch = "three"\n', "expected an integer"),
    ("allow_remote = 1\n", "expected true or false"),
    ('keep_alive = "soon"\n', "expected a duration"),
    ("max_batch = 0\n", "max_batch must be >= 1"),
    ('tcp = "localhost"\n', "HOST:PORT"),
    ("model = [1, 2\n", "not valid TOML"),
])
def test_bad_file_values_are_named(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(MoedError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(f, env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(MoedError, match="MOED_MAX_QUEUE"):
        load_config(None, env={"MOED_MAX_QUEUE": "lots"})
    assert load_config(None, env={"MOED_ALLOW_REMOTE": "yes"}).allow_remote is True


def test_missing_file():
    with pytest.raises(MoedError, match="config file not found"):
        load_config("/no/such.toml", env={})


@pytest.mark.parametrize("value,seconds", [(30, 30.0), ("30", 30.0), ("2.5s", 2.5), ("5m", 300.0), ("1h", 3600.0),
                                           ("250ms", 0.25), (-1, -1.0), ("forever", -1.0), ("-5m", -1.0)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


def test_host_port():
    assert split_host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_host_port("[::1]:0") == ("::1", 0)
    for bad in ("::1:5", "host", "h:99999", ":5"):
        with pytest.raises(MoedError):
            split_host_port(bad)


def test_token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert Config(token_file=str(f)).secret == "s3cret"
    assert Config(token="direct", token_file=str(f)).secret == "direct"
    with pytest.raises(MoedError, match="cannot read token file"):
        _ = Config(token_file=str(tmp_path / "none")).secret
