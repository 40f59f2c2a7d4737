"""Fixtures: a tiny random-init Llama with a real byte-level BPE tokenizer and chat template,
saved as an HF directory, plus small data files in each format."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

# What `fulltune` sets for itself in cli.main (setdefault): set for the whole session, so a test that
# calls main() in-process changes nothing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Set once per process by a library as it is first imported, not by a test: threadpoolctl (which scipy
# imports, and which the lmeval extra brings) sets KMP_DUPLICATE_LIB_OK. Imported here, the session
# starts with it, whichever test would have imported it first.
with contextlib.suppress(ImportError):
    import threadpoolctl  # noqa: F401


def _config_values(module) -> dict:
    """Every key of a torch config module (dynamo, inductor) by its repr, or "<hidden>" where it was
    deleted: a deleted key raises 'does not exist' at the next compile (pytest's monkeypatch deletes
    a config key it did not find in the module's __dict__ on undo)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading a deprecated key warns; reading is all this does
        for key in sorted(getattr(module, "_config", {})):
            try:
                out[key] = repr(getattr(module, key))
            except AttributeError:
                out[key] = "<hidden>"
    return out


# Set by pytest or by torch itself for its own use, once per process (inductor's C++ glue reads the
# address of a function from it), not by a test.
TORCH_OWN_ENV = {"PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"}


def global_state() -> dict:
    """The process-wide state a test must leave as it found it, on every CPU kind and in any order."""
    import torch._dynamo.config
    import torch._inductor.config

    from fulltune.memory.measure import malloc_settings

    state = {"dynamo." + k: v for k, v in _config_values(torch._dynamo.config).items()}
    state.update({"inductor." + k: v for k, v in _config_values(torch._inductor.config).items()})
    state.update({"env." + k: v for k, v in os.environ.items() if k not in TORCH_OWN_ENV})
    state.update(
        {
            "default_dtype": torch.get_default_dtype(),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "grad_enabled": torch.is_grad_enabled(),
            "inference_mode": torch.is_inference_mode_enabled(),
            "autocast_cpu": torch.is_autocast_enabled("cpu"),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "mallopt": malloc_settings(),
            "cwd": os.getcwd(),
            "sigint": signal.getsignal(signal.SIGINT),
            "sigterm": signal.getsignal(signal.SIGTERM),
            "distributed": torch.distributed.is_available() and torch.distributed.is_initialized(),
        }
    )
    return state


@pytest.fixture(autouse=True)
def _leaves_global_state_unchanged(request):
    """Fails the test that leaks global state (config of torch.compile, default dtype, threads, grad
    mode, glibc's malloc settings, environment, signal handlers), naming what changed."""
    before = global_state()
    yield
    after = global_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "<absent>") != after.get(k, "<absent>"))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}" for k in changed[:8])
        pytest.fail(f"{request.node.nodeid} left global state changed ({len(changed)}): {shown}", pytrace=False)


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the",
    "movie",
    "was",
    "great",
    "fun",
    "and",
    "the",
    "plot",
    "was",
    "dull",
    "boring",
    "slow",
    "film",
    "actors",
    "good",
    "bad",
    "review",
    "positive",
    "negative",
    "classify",
    "sentiment",
    "answer",
    "one",
    "word",
    "what",
    "is",
    "capital",
    "of",
    "france",
    "paris",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, layers: int = 3, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """An HF model directory: tiny Llama (tied embeddings) + tokenizer with a chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [
            WORDS[int(j)] for j in torch.randint(0, 12, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        ]
        label = "positive" if i % 2 == 0 else "negative"
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "classify " + " ".join(words)},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", sentiment_records(24))


def tiny_overrides(model_dir: Path, train_file: Path, out: Path, **extra) -> list[str]:
    """Overrides that make a fast, deterministic fp32 CPU run on the tiny model."""
    base = {
        "model.path": str(model_dir),
        "data.train": str(train_file),
        "data.max_seq_len": 64,
        "train.output_dir": str(out),
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.micro_batch_size": 4,
        "train.progress": False,
        "optim.lr": 1e-3,
        "schedule.warmup_steps": 1,
        "eval.probes": "[]",
        "eval.theta0_cache": False,  # every test scores its own θ0 (tests/test_records.py tests the cache)
        "eval.drift_general": 0,  # drift on general text: tests/test_drift_run.py (kl_task stays on with a val set)
        "train.peak_probe_s": 0.02,
        "train.report": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pytest_addoption(parser):
    parser.addoption(
        "--order",
        default="file",
        metavar="file|reverse|random[:SEED]",
        help="run the tests in file order (default), reversed, or shuffled: none may depend on another's "
        "leftovers (the global-state check above fails the one that leaks)",
    )


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("random"):
        import random

        seed = int(order.partition(":")[2] or random.randrange(1 << 16))
        random.Random(seed).shuffle(items)
        print(f"[tests] shuffled with --order=random:{seed}")
    elif order != "file":
        raise pytest.UsageError(f"--order: {order!r} is not file, reverse or random[:SEED]")
