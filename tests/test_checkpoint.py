"""Checkpoint files: atomic writes survive a crash, safe loading explains failures, RNG state round-trips, and
fine-tuning weights load with a report."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfine import checkpoint as checkpoint_io
from dfine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    class_map_from_names,
    extract_model_state,
    load_checkpoint,
    load_weights_for_finetune,
    load_weights_strict,
    restore_rng_state,
    save_atomic,
)


def test_save_atomic_writes_a_file_that_loads_with_weights_only(tmp_path: Path):
    path = tmp_path / "sub" / "last.pth"
    save_atomic({"epoch": 3, "model": {"w": torch.arange(4.0)}}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3
    torch.testing.assert_close(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]


def test_a_failure_before_the_rename_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(checkpoint_io.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_atomic({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_process_killed_between_temp_write_and_rename_leaves_the_previous_file_loadable(tmp_path: Path):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from dfine import checkpoint as checkpoint_io
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint_io.os.replace = killed
        checkpoint_io.save_atomic({{"epoch": 2, "w": torch.zeros(1000)}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    assert any(
        p.name.startswith(".last.pth.tmp") for p in tmp_path.iterdir()
    )  # the killed write got that far
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1
    torch.testing.assert_close(loaded["w"], torch.ones(3))


def test_missing_file_error_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.pth"):
        load_checkpoint(tmp_path / "nothere.pth")


def test_truncated_file_is_reported_as_corrupt(tmp_path: Path):
    path = tmp_path / "last.pth"
    save_atomic({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_checkpoint_with_pickled_objects_is_refused_with_a_weights_only_explanation(tmp_path: Path):
    path = tmp_path / "old.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "argparse.Namespace" in str(error.value)
    assert "weights_only" in str(error.value)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_model_weights_are_found_in_every_published_layout():
    weights = {"a.weight": torch.zeros(2)}
    ema_weights = {"a.weight": torch.ones(2)}
    assert extract_model_state(weights) == (weights, "state_dict")
    assert extract_model_state({"model": weights})[1] == "model"
    state, source = extract_model_state({"model": weights, "ema": {"module": ema_weights, "updates": 5}})
    assert source == "ema" and state is not ema_weights and torch.equal(state["a.weight"], torch.ones(2))
    assert (
        extract_model_state({"model": weights, "ema": {"module": ema_weights}}, prefer_ema=False)[1]
        == "model"
    )
    assert list(extract_model_state({"model": {"module.a.weight": torch.zeros(2)}})[0]) == ["a.weight"]
    with pytest.raises(CheckpointError, match="optimizer"):
        extract_model_state({"optimizer": {"state": {}}})


class TinyDecoder(nn.Module):
    """The class-dependent tensors of D-FINE's decoder, with the original attribute names."""

    def __init__(self, num_classes: int, hidden: int = 4) -> None:
        super().__init__()
        self.enc_score_head = nn.Linear(hidden, num_classes)
        self.dec_score_head = nn.ModuleList([nn.Linear(hidden, num_classes) for _ in range(2)])
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden, padding_idx=num_classes)
        self.query_pos_head = nn.Linear(hidden, hidden)


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int, backbone_width: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, backbone_width)
        self.decoder = TinyDecoder(num_classes)


def test_finetune_with_fewer_classes_keeps_mapped_rows_and_reports_every_tensor():
    torch.manual_seed(0)
    pretrained = TinyDetector(num_classes=5, backbone_width=6).state_dict()
    pretrained["decoder.extra.weight"] = torch.zeros(1)
    model = TinyDetector(num_classes=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights_for_finetune(model, {"ema": {"module": pretrained}}, class_map={0: 4, 2: 1})

    loaded = model.state_dict()
    torch.testing.assert_close(
        loaded["decoder.query_pos_head.weight"], pretrained["decoder.query_pos_head.weight"]
    )
    for key in (
        "decoder.enc_score_head.weight",
        "decoder.dec_score_head.1.bias",
        "decoder.denoising_class_embed.weight",
    ):
        torch.testing.assert_close(loaded[key][0], pretrained[key][4])
        torch.testing.assert_close(loaded[key][2], pretrained[key][1])
        torch.testing.assert_close(loaded[key][1], initial[key][1])  # unmapped class keeps the new init
    torch.testing.assert_close(
        loaded["decoder.denoising_class_embed.weight"][3], initial["decoder.denoising_class_embed.weight"][3]
    )
    torch.testing.assert_close(loaded["backbone.weight"], initial["backbone.weight"])

    assert {key for key, _, _ in report.reinitialised} == {
        "decoder.enc_score_head.weight",
        "decoder.enc_score_head.bias",
        "decoder.dec_score_head.0.weight",
        "decoder.dec_score_head.0.bias",
        "decoder.dec_score_head.1.weight",
        "decoder.dec_score_head.1.bias",
        "decoder.denoising_class_embed.weight",
    }
    assert all(kept == 2 for _, kept, _ in report.reinitialised)
    assert [key for key, _, _ in report.skipped] == ["backbone.weight", "backbone.bias"]
    assert report.unexpected == ["decoder.extra.weight"]
    assert "decoder.query_pos_head.weight" in report.loaded
    assert "re-initialised 7" in report.summary()


def test_finetune_without_class_map_reinitialises_heads_entirely():
    torch.manual_seed(0)
    pretrained = TinyDetector(num_classes=80).state_dict()
    model = TinyDetector(num_classes=2)
    initial = model.state_dict()["decoder.enc_score_head.weight"].clone()
    report = load_weights_for_finetune(model, pretrained)
    torch.testing.assert_close(model.state_dict()["decoder.enc_score_head.weight"], initial)
    torch.testing.assert_close(model.state_dict()["backbone.weight"], pretrained["backbone.weight"])
    assert len(report.reinitialised) == 7 and not report.skipped and not report.missing


def test_class_map_from_names_matches_case_insensitively():
    assert class_map_from_names(["Dog", "unicorn", "person"], ["person", "bicycle", "dog"]) == {0: 2, 2: 0}


def test_strict_loading_suggests_tune_when_only_class_heads_differ():
    with pytest.raises(CheckpointError) as error:
        load_weights_strict(TinyDetector(num_classes=3), {"model": TinyDetector(num_classes=5).state_dict()})
    message = str(error.value)
    assert "decoder.enc_score_head.weight" in message and "-t/--tune" in message


def test_strict_loading_lists_missing_and_unexpected_keys_and_loads_a_match():
    state = TinyDetector(num_classes=3).state_dict()
    state["stray.weight"] = state.pop("backbone.weight")
    with pytest.raises(CheckpointError) as error:
        load_weights_strict(TinyDetector(num_classes=3), state)
    assert "backbone.weight" in str(error.value) and "stray.weight" in str(error.value)
    assert "--tune" not in str(error.value)
    source = TinyDetector(num_classes=3)
    target = TinyDetector(num_classes=3)
    load_weights_strict(target, {"ema": {"module": source.state_dict()}})
    torch.testing.assert_close(target.backbone.weight, source.backbone.weight)


def test_temporary_name_is_hidden_and_per_process(tmp_path: Path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(source, destination):
        seen.append(Path(source).name)
        real_replace(source, destination)

    monkeypatch.setattr(checkpoint_io.os, "replace", spy)
    save_atomic({"a": 1}, tmp_path / "best.pth")
    assert seen == [f".best.pth.tmp-{os.getpid()}"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()
    dead = tmp_path / f".last.pth.tmp-{dead_pid}"
    live = tmp_path / f".best.pth.tmp-{live_pid}"
    other = tmp_path / "notes.tmp-1"  # not one of ours: no leading dot
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    checkpoint_io.save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pth")
    assert not dead.exists() and live.exists() and other.exists()
    assert checkpoint_io.load_checkpoint(tmp_path / "last.pth")["x"].shape == (1,)


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path: Path, monkeypatch):
    target = tmp_path / "last.pth"
    checkpoint_io.save_atomic({"epoch": 1}, target)

    def no_space(obj, handle):
        handle.write(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", no_space)
    with pytest.raises(checkpoint_io.CheckpointError, match=r"no space left.*still holds the previous"):
        checkpoint_io.save_atomic({"epoch": 2}, target)
    assert checkpoint_io.load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_text_file_is_named_as_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "notes.pth"
    path.write_text("hello world\n")
    with pytest.raises(checkpoint_io.CheckpointError, match=r"notes\.pth is not a PyTorch checkpoint"):
        checkpoint_io.load_checkpoint(path)
