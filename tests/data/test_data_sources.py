"""Verified download, cache and mirror of official data, against a real HTTP server on 127.0.0.1.

The server serves the real oracle file of Lost in the Middle (from ../shared/data), a copy with one
byte changed, a truncated copy, and a response that breaks off mid-body. The source's base URL is
pointed at it with NEEDLES_MDQA_BASE_URL, as a user would for an internal mirror server.
"""

from __future__ import annotations

import gzip
import shutil

import pytest
from loopback import FileServer

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import LOST_IN_THE_MIDDLE, fetch, file_sha256

ORACLE = "qa_data/nq-open-oracle.jsonl.gz"
OTHER = "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_9.jsonl.gz"


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = FileServer()
    monkeypatch.setenv("NEEDLES_MDQA_BASE_URL", srv.url)
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEEDLES_MDQA_MIRROR", raising=False)
    monkeypatch.delenv("NEEDLES_ALLOW_UNOFFICIAL_DATA", raising=False)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def oracle_bytes(shared_data) -> bytes:
    return (shared_data / "lost-in-the-middle" / ORACLE).read_bytes()


def test_download_is_verified_cached_and_reused(server, oracle_bytes):
    server.files[ORACLE] = (oracle_bytes, "ok")
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert got.official and got.origin == "download"
    assert got.sha256 == LOST_IN_THE_MIDDLE.files[ORACLE].sha256 == file_sha256(got.path)
    assert LOST_IN_THE_MIDDLE.revision in str(got.path)  # cached per pinned revision
    with gzip.open(got.path, "rt") as f:
        assert sum(1 for _ in f) == 2655
    again = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert again.origin == "cache" and server.requests == [f"/{ORACLE}"]


def test_wrong_checksum_is_refused_and_not_cached(server, oracle_bytes):
    bad = bytearray(oracle_bytes)
    bad[1000] ^= 0xFF  # same size, different bytes
    server.files[ORACLE] = (bytes(bad), "ok")
    with pytest.raises(NeedlesError, match="SHA-256"):
        fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert not any(p.is_file() for p in _cache_files(LOST_IN_THE_MIDDLE.name))


def test_truncated_file_is_refused(server, oracle_bytes):
    server.files[ORACLE] = (oracle_bytes[: len(oracle_bytes) // 3], "ok")
    with pytest.raises(NeedlesError, match="size"):
        fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert not any(p.is_file() for p in _cache_files(LOST_IN_THE_MIDDLE.name))


def test_connection_cut_mid_body_is_an_error(server, oracle_bytes):
    server.files[ORACLE] = (oracle_bytes, "cut")
    with pytest.raises(NeedlesError, match="cannot download"):
        fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert not any(p.is_file() for p in _cache_files(LOST_IN_THE_MIDDLE.name))


def test_missing_file_on_server(server):
    with pytest.raises(NeedlesError, match="404"):
        fetch(LOST_IN_THE_MIDDLE, OTHER, progress=False)


def test_damaged_cache_entry_is_downloaded_again(server, oracle_bytes):
    server.files[ORACLE] = (oracle_bytes, "ok")
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    got.path.write_bytes(b"damaged")
    again = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert again.origin == "download" and file_sha256(again.path) == again.sha256
    assert len(server.requests) == 2


def test_mirror_is_exclusive_and_verified(server, oracle_bytes, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "qa_data").mkdir(parents=True)
    server.files[OTHER] = (b"anything", "ok")
    monkeypatch.setenv("NEEDLES_MDQA_MIRROR", str(mirror))
    # a file the mirror lacks is an error, never a download
    with pytest.raises(NeedlesError, match="has no"):
        fetch(LOST_IN_THE_MIDDLE, OTHER, progress=False)
    assert server.requests == []
    # the official bytes in the mirror are accepted as official
    (mirror / ORACLE).write_bytes(oracle_bytes)
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert got.official and got.origin == "mirror" and got.path == mirror / ORACLE
    # other bytes are refused, or accepted as NON-official with the explicit opt-in
    (mirror / ORACLE).write_bytes(oracle_bytes[:-10] + b"0123456789")
    with pytest.raises(NeedlesError, match="allow_unofficial_data"):
        fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, metadata={"allow_unofficial_data": True}, progress=False)
    assert not got.official and "unverified" in got.label
    monkeypatch.setenv("NEEDLES_ALLOW_UNOFFICIAL_DATA", "1")
    assert not fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False).official
    assert server.requests == []


def test_metadata_mirror_key_wins_over_environment(server, oracle_bytes, tmp_path, monkeypatch):
    env_mirror, meta_mirror = tmp_path / "env", tmp_path / "meta"
    for root in (env_mirror, meta_mirror):
        (root / "qa_data").mkdir(parents=True)
        shutil.copyfile(_shared_oracle(oracle_bytes, tmp_path), root / ORACLE)
    monkeypatch.setenv("NEEDLES_MDQA_MIRROR", str(env_mirror))
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, metadata={"mdqa_mirror": str(meta_mirror)}, progress=False)
    assert got.path == meta_mirror / ORACLE


def test_unknown_file_is_refused(server):
    with pytest.raises(NeedlesError, match="not a file of"):
        fetch(LOST_IN_THE_MIDDLE, "qa_data/something_else.jsonl.gz", progress=False)


def _cache_files(name: str):
    from harness_ext.core.paths import cache_root

    return (cache_root() / "data" / name).rglob("*")


def _shared_oracle(data: bytes, tmp_path):
    path = tmp_path / "oracle.jsonl.gz"
    path.write_bytes(data)
    return path


def test_write_mirror_makes_a_verified_offline_copy(server, oracle_bytes, tmp_path, monkeypatch):
    from harness_ext.data.sources import write_mirror

    server.files[ORACLE] = (oracle_bytes, "ok")
    out = tmp_path / "mirror"
    write_mirror(LOST_IN_THE_MIDDLE, [ORACLE], out)
    assert file_sha256(out / ORACLE) == LOST_IN_THE_MIDDLE.files[ORACLE].sha256
    server.files.clear()  # offline from here on
    monkeypatch.setenv("NEEDLES_MDQA_MIRROR", str(out))
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE, progress=False)
    assert got.official and got.origin == "mirror"
