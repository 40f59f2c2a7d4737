"""Checkpoint and final/ manifests: size and sha256 of every file, verified on resume and by `fulltune verify`."""

from __future__ import annotations

import json

from conftest import QUICKSTART, tiny_overrides
from safetensors.torch import load_file

from fulltune.atomic import MANIFEST, sha256_file, verify_dir
from fulltune.cli import main


def _args(tiny_dir, data, out, **extra):
    return [
        "train",
        QUICKSTART,
        *tiny_overrides(
            tiny_dir,
            data,
            out,
            **{"train.max_steps": 3, "train.save_interval": 1, "train.keep_checkpoints": 5, **extra},
        ),
        "eval.task_file=",
        "data.val_fraction=0",
    ]


def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    straight = load_file(str(out / "final" / "model.safetensors"))
    ckpts = out / "checkpoints"
    manifest = json.loads((ckpts / "step-0000003" / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml"} <= manifest.keys()
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.count(": ok\n") == 4  # 3 checkpoints and final/
    weights = ckpts / "step-0000003" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:  # a torn write: the tail is gone
        fh.truncate(size - 100)
    assert main(["verify", str(ckpts / "step-0000003")]) == 1
    assert f"DAMAGED: model.safetensors: {size - 100} bytes, the manifest says {size}" in capsys.readouterr().out
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": "auto"})) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint {ckpts / 'step-0000003'} is damaged (model.safetensors: {size - 100} bytes" in printed
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in printed
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert all(resumed[k].equal(straight[k]) for k in straight)  # step 3 trained again, the same bits


def test_a_flipped_byte_is_found_and_an_explicit_damaged_checkpoint_refused(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    target = out / "checkpoints" / "step-0000002" / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": str(target.parent)})) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"fulltune: error: train.resume: {target.parent} is damaged (optimizer.pt: sha256 differs from the manifest)"
    )
    (out / "final" / "config.json").write_text("{}")
    assert main(["verify", str(out / "final")]) == 1
    assert "DAMAGED: config.json: " in capsys.readouterr().out


def test_a_checkpoint_from_before_manifests_is_still_resumed(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    (out / "checkpoints" / "step-0000003" / MANIFEST).unlink()
    capsys.readouterr()
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": "auto"})) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-0000003'} at step 3" in capsys.readouterr().out


def test_files_another_rank_hashed_are_taken_from_its_entries(tmp_path):
    """Under FSDP2 each rank fsyncs and hashes the shards it wrote (in parallel) and rank 0 writes the
    manifest from those entries, hashing only its own files: a 70B checkpoint on a network
    filesystem is not hashed by rank 0 alone while the others wait at a barrier."""
    from fulltune.atomic import file_entry, write_dir_atomically

    def write(tmp):
        (tmp / "dcp").mkdir()
        (tmp / "dcp" / "__1_0.distcp").write_bytes(b"rank one's shard")
        (tmp / "trainer_state.json").write_text("{}")
        hashed.update({"dcp/__1_0.distcp": file_entry(tmp / "dcp" / "__1_0.distcp") | {"sha256": "from-rank-1"}})

    hashed: dict = {}
    final = write_dir_atomically(tmp_path / "ckpt", write, manifest=True, hashed=hashed)
    listed = json.loads((final / MANIFEST).read_text())["files"]
    assert listed["dcp/__1_0.distcp"] == {"bytes": 16, "sha256": "from-rank-1"}  # not hashed again
    assert listed["trainer_state.json"]["sha256"] == sha256_file(final / "trainer_state.json")
    assert "sha256 differs" in verify_dir(final)  # and verify still reads every byte
