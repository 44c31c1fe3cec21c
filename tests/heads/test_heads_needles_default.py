"""`needles heads` without --needles: the reference needles come from $NEEDLES_SHARED_DATA when set, else from
the niah task's data source (its mirror here), so detection probes and the niah task read the same file."""

from __future__ import annotations

import shutil

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.heads import defaults


def test_without_shared_data_the_needles_come_from_the_niah_source(tmp_path, monkeypatch, shared_data):
    reference = shared_data / "retrieval-head" / "needles.jsonl"
    mirror = tmp_path / "mirror" / "haystack_for_detect"
    mirror.mkdir(parents=True)
    shutil.copyfile(reference, mirror / "needles.jsonl")
    monkeypatch.delenv("NEEDLES_SHARED_DATA", raising=False)
    monkeypatch.setattr(defaults, "__file__", str(tmp_path / "clone" / "harness_ext" / "cli" / "x.py"))
    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(tmp_path / "mirror"))
    assert defaults.shared_needles() == mirror / "needles.jsonl"  # verified against the pinned SHA-256
    (mirror / "needles.jsonl").write_text("{}\n")  # a corrupted mirror copy is refused, not read
    with pytest.raises(NeedlesError):
        defaults.shared_needles()


def test_shared_data_wins_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_SHARED_DATA", str(tmp_path))
    assert defaults.shared_needles() == tmp_path / defaults.DEFAULT_NEEDLES
