import pytest

from fulltune.config import RunConfig, describe_fields, load_config
from fulltune.errors import UserError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=3e-5", "data.max_seq_len=256", "eval.labels=[a, b]"])
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.max_seq_len == 256
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.eval.labels == ["a", "b"]
    assert cfg.model.path == RunConfig().model.path


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: -1\n  lrr: 3\ntrain:\n  micro_batch_size: two\nbogus: {}\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["schedule.name=exponential"])
    msg = str(err.value)
    for expected in (
        "optim.lr: -1.0 must be > 0.0",
        "optim.lrr: unknown key",
        "train.micro_batch_size: expected int",
        "bogus: unknown key",
        "schedule.name: 'exponential' is not one of",
    ):
        assert expected in msg, msg
    assert "5 problems" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_syntax():
    with pytest.raises(UserError, match="expected key=value"):
        load_config(None, ["optim.lr"])


def test_every_field_documented():
    table = describe_fields()
    assert "| `optim.layer_lr_decay` | `1.0` |" in table
    for line in table.splitlines()[2:]:
        assert len(line.split("|")[3].strip()) > 10, line


def test_the_docs_config_table_is_the_generated_one():
    """`fulltune config` and docs/config.md list the same keys, defaults and meanings."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert describe_fields().rstrip("\n") in page


def test_an_empty_section_takes_its_defaults(tmp_path):
    """`train:` with every key commented out is an empty section, not an error; an override still goes in."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  # epochs: 3\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.max_steps=5"])
    assert cfg.train.max_steps == 5 and cfg.train.epochs == RunConfig().train.epochs and cfg.optim.lr == 1e-4


def test_a_long_run_is_allowed_when_asked_for():
    cfg = load_config(None, ["train.max_steps=20000000", "train.allow_long_run=true"])
    assert cfg.train.max_steps == 20_000_000
    with pytest.raises(UserError, match=r"train.max_steps: 20,000,000 optimiser steps is more than 10,000,000"):
        load_config(None, ["train.max_steps=20000000"])


def test_an_override_of_a_yaml_key_is_blamed_on_the_command_line_only(tmp_path):
    """The YAML's own problem is 'in FILE'; a misspelled override is not, even beside a YAML file."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: abc\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["optimm.lr=1"])
    assert str(err.value).splitlines() == [
        f"invalid config in {path} (2 problems):",
        "  optim.weight_decay: expected float, got str 'abc'",
        "  optimm: unknown key (valid: model, data, optim, schedule, train, anchor, loss, eval) "
        "(set on the command line)",
    ]
    with pytest.raises(UserError) as err:
        load_config(QUICKSTART_PATH, ["optimm.lr=1"])
    assert str(err.value).startswith("invalid config (1 problem):")


QUICKSTART_PATH = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
