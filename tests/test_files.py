"""inpars.files.atomic_write: the target holds the old content or the new, never a part."""

from __future__ import annotations

import pytest

from inpars.files import TMP_PREFIX, atomic_write
from inpars.storage import LocalStorage


def test_target_keeps_old_content_while_writing_and_gets_new_content_whole(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n", encoding="utf-8")
    with atomic_write(target) as f:
        f.write("new line 1\n")
        f.flush()
        assert target.read_text(encoding="utf-8") == "old\n"  # written in place would show the new line
        f.write("new line 2\n")
    assert target.read_text(encoding="utf-8") == "new line 1\nnew line 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_writer_that_raises_leaves_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "run.trec"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(target, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]


def test_writer_that_raises_creates_nothing(tmp_path):
    target = tmp_path / "sub" / "new.tsv"
    with pytest.raises(ValueError):
        with atomic_write(target) as f:
            f.write("a\tb\n")
            raise ValueError("bad row")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_makes_the_folder_and_honours_text_options(tmp_path):
    target = tmp_path / "a" / "b" / "t.tsv"
    with atomic_write(target, newline="") as f:
        f.write("é\r\n")
    assert target.read_bytes() == "é\r\n".encode()


def test_temp_file_is_never_listed_by_local_storage(tmp_path):
    store = LocalStorage(tmp_path)
    with atomic_write(tmp_path / "summary.json") as f:
        f.write("{}")
        names = [p.name for p in tmp_path.iterdir()]
        assert len(names) == 1 and names[0].startswith(TMP_PREFIX)
        assert store.list() == []
    assert store.list() == ["summary.json"]


def test_rejects_modes_that_are_not_a_whole_write(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert not (tmp_path / "x").exists()
