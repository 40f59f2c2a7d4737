"""The check in conftest.py that fails a test leaving process-wide state changed can itself fail:
it sees the leak that broke test_lean.py on an AVX512 EPYC (an inductor key deleted by pytest's
monkeypatch), a changed environment and the malloc settings a run leaves."""

from __future__ import annotations

import os

import pytest
from conftest import global_state


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def test_the_check_sees_an_inductor_key_deleted_by_monkeypatch_undo():
    import torch._inductor.config as inductor_config

    was = inductor_config.pattern_matcher
    before = global_state()
    patch = pytest.MonkeyPatch()
    patch.setattr(inductor_config, "pattern_matcher", not was)
    patch.undo()  # pytest ≥ 8.4 deletes the key (not in the module's __dict__): hidden, "does not exist"
    try:
        assert _changed(before, global_state()) == {"inductor.pattern_matcher"}
        with pytest.raises(AttributeError, match="does not exist"):
            _ = inductor_config.pattern_matcher
    finally:
        inductor_config.pattern_matcher = was  # visible again, with its old value
    assert _changed(before, global_state()) == set()


def test_the_check_sees_the_environment_and_malloc_settings():
    from fulltune.memory.measure import _mallopt, malloc_restored, malloc_settings

    before = global_state()
    os.environ["FULLTUNE_LEAK_CHECK"] = "1"
    try:
        assert _changed(before, global_state()) == {"env.FULLTUNE_LEAK_CHECK"}
    finally:
        del os.environ["FULLTUNE_LEAK_CHECK"]
    with malloc_restored():
        _mallopt(trim_threshold=1 << 30)
        assert _changed(before, global_state()) == {"mallopt"} and malloc_settings()["trim_threshold"] == 1 << 30
    assert _changed(before, global_state()) == set()
