"""fraud.atomic: a reader sees the old file or folder or the new one, never a half-written one."""

from __future__ import annotations

import json

import pytest

from fraud import atomic


def test_write_text_and_json_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic.write_text(target, "old")
    atomic.write_json(target, {"a": 1}, indent=2)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failure_while_writing_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("complete old content")
    with pytest.raises(RuntimeError, match="disk full"), atomic.replacing(target) as temp:
        temp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "complete old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_replace_dir_swaps_a_folder_in_and_removes_the_old_one(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    assert atomic.replace_dir(staging, target) == target
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replace_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        atomic.replace_dir(tmp_path / "missing-staging", target)
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
