"""How this run directory was made: with fulltune at commit 8e73e96, before the trainer state became a
dataclass (state.py) and metrics.jsonl got one owner (metrics.py). Run from /tmp/oldckpt; the step-2
checkpoint, config.yaml, the marker and metrics.jsonl up to step 3 (a kill after step 3) were kept,
and step 4's metrics line as old_code_step4.json. tests/test_resume_old.py resumes it with today's code."""

import os
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/tests")
from conftest import make_model, make_tokenizer, sentiment_records, tiny_overrides, write_jsonl  # noqa: E402

from fulltune.config import load_config  # noqa: E402
from fulltune.train import run_training  # noqa: E402

root = Path("/tmp/oldckpt")
os.chdir(root)
tok = make_tokenizer()
make_model(len(tok)).save_pretrained("tiny")
tok.save_pretrained("tiny")
write_jsonl(Path("d.jsonl"), sentiment_records(24))
write_jsonl(Path("general.jsonl"), [{"text": r["messages"][0]["content"]} for r in sentiment_records(16, seed=1)])
extra = {"train.max_steps": 4, "train.save_interval": 2, "train.keep_checkpoints": 5}
extra.update({"data.general": "[general.jsonl]", "data.mix_ratio": 0.25})
run_training(load_config(None, tiny_overrides(Path("tiny"), Path("d.jsonl"), Path("run"), **extra)))
