"""Whole-or-nothing file writes (datasets/atomic_file.py): what a reader of the path can see."""

import pytest

from o2o.datasets.atomic_file import replacing, write_atomic


def test_replacing_puts_the_written_file_in_place_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "policy.onnx"
    path.write_bytes(b"old")
    with replacing(path, fsync=True) as tmp:
        tmp.write_bytes(b"new")
        assert tmp.parent == tmp_path and tmp != path and path.read_bytes() == b"old"  # not in place before the end
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["policy.onnx"]


def test_a_failing_writer_keeps_the_old_content_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "recommended.json"
    write_atomic(path, '{"a": 1}')
    with pytest.raises(ValueError, match="check failed"), replacing(path) as tmp:
        tmp.write_text("half a file")
        raise ValueError("check failed")
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["recommended.json"]
