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


def test_the_readme_config_table_is_the_generated_one():
    """`fulltune config` and the README list the same keys, defaults and meanings."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe_fields().rstrip("\n") in readme
