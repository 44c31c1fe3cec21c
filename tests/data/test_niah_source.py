"""The retrieval-head (NIAH) data source: pinned checksums, offline mirror, verified download, CLI.

Real files come from ../shared/data/retrieval-head (its MANIFEST.sha256 keeps needles.jsonl at the
root; upstream, and therefore in a mirror, it is haystack_for_detect/needles.jsonl).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from loopback import FileServer

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import (
    RETRIEVAL_HEAD,
    RETRIEVAL_HEAD_HAYSTACK,
    RETRIEVAL_HEAD_NEEDLES,
    SOURCES,
    fetch,
    file_sha256,
)


def _shared_path(shared_data: Path, relpath: str) -> Path:
    root = shared_data / "retrieval-head"
    return root / ("needles.jsonl" if relpath == RETRIEVAL_HEAD_NEEDLES else relpath)


def _mirror(shared_data: Path, out: Path) -> Path:
    for rel in RETRIEVAL_HEAD.files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_shared_path(shared_data, rel), out / rel)
    return out


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("NEEDLES_NIAH_MIRROR", "NEEDLES_NIAH_BASE_URL", "NEEDLES_ALLOW_UNOFFICIAL_DATA"):
        monkeypatch.delenv(var, raising=False)


def test_pins_match_the_shared_manifest(shared_data):
    pinned = {}
    for line in (shared_data / "retrieval-head" / "MANIFEST.sha256").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            sha, size, path = line.split()
            pinned[path] = (sha, int(size))
    assert (
        "3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2" in (shared_data / "retrieval-head" / "MANIFEST.sha256").read_text()
    )
    assert RETRIEVAL_HEAD.revision == "3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2"
    assert set(RETRIEVAL_HEAD.files) == {RETRIEVAL_HEAD_NEEDLES, *RETRIEVAL_HEAD_HAYSTACK}
    for rel, entry in RETRIEVAL_HEAD.files.items():
        shared_rel = "needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel
        assert (entry.sha256, entry.size) == pinned[shared_rel]
        assert file_sha256(_shared_path(shared_data, rel)) == entry.sha256
    assert SOURCES["retrieval-head"] is RETRIEVAL_HEAD
    assert RETRIEVAL_HEAD.default_base_url == (
        "https://raw.githubusercontent.com/nightdessert/Retrieval_Head/3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2"
    )


def test_mirror_files_are_verified(clean_env, shared_data, tmp_path):
    mirror = _mirror(shared_data, tmp_path / "mirror")
    for rel in RETRIEVAL_HEAD.files:
        got = fetch(RETRIEVAL_HEAD, rel, {"niah_mirror": str(mirror)}, progress=False)
        assert got.official and got.origin == "mirror"
        assert got.sha256 == RETRIEVAL_HEAD.files[rel].sha256
        assert got.path == (mirror / rel).resolve()


def test_corrupted_copy_is_refused(clean_env, shared_data, tmp_path, monkeypatch):
    mirror = _mirror(shared_data, tmp_path / "mirror")
    victim = mirror / RETRIEVAL_HEAD_HAYSTACK[1]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01  # same size, one bit different
    victim.write_bytes(bytes(data))
    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(mirror))
    with pytest.raises(NeedlesError, match="is not the official haystack_for_detect/part2/p1.txt") as exc:
        fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK[1], progress=False)
    assert "SHA-256" in str(exc.value) and "allow_unofficial_data" in exc.value.fix
    # the untouched files of the same mirror still pass
    assert fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK[0], progress=False).official
    # an explicit opt-in returns it, marked as non-official
    got = fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK[1], {"allow_unofficial_data": True}, progress=False)
    assert not got.official and "unverified" in got.label


def test_missing_mirror_file_names_the_fetch_command(clean_env, shared_data, tmp_path):
    mirror = _mirror(shared_data, tmp_path / "mirror")
    (mirror / RETRIEVAL_HEAD_NEEDLES).unlink()
    with pytest.raises(NeedlesError, match="has no haystack_for_detect/needles.jsonl") as exc:
        fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, {"niah_mirror": str(mirror)}, progress=False)
    assert "needles data fetch niah" in exc.value.fix


def test_download_is_verified_and_cached(clean_env, shared_data, monkeypatch):
    files = {rel: _shared_path(shared_data, rel).read_bytes() for rel in RETRIEVAL_HEAD.files}
    good = files[RETRIEVAL_HEAD_HAYSTACK[2]]
    files[RETRIEVAL_HEAD_HAYSTACK[2]] = good[:-1] + bytes([good[-1] ^ 0x20])
    srv = FileServer(files)
    try:
        monkeypatch.setenv("NEEDLES_NIAH_BASE_URL", srv.url)
        got = fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, progress=False)
        assert got.official and got.origin == "download" and RETRIEVAL_HEAD.revision in str(got.path)
        assert fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES, progress=False).origin == "cache"
        assert srv.requests == ["/haystack_for_detect/needles.jsonl"]  # the upstream path, fetched once
        with pytest.raises(NeedlesError, match="is not the pinned file"):
            fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK[2], progress=False)
        with pytest.raises(NeedlesError, match="is not the pinned file"):  # nothing was cached
            fetch(RETRIEVAL_HEAD, RETRIEVAL_HEAD_HAYSTACK[2], progress=False)
    finally:
        srv.close()


def test_cli_verify_and_fetch_niah(clean_env, shared_data, tmp_path, monkeypatch, capsys):
    mirror = _mirror(shared_data, tmp_path / "mirror")
    assert main(["data", "verify", "niah", "--mirror", str(mirror)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK") == 4 and "haystack_for_detect/part3/p1.txt" in out

    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(mirror))
    assert main(["data", "fetch", "niah", "--out", str(tmp_path / "copy")]) == 0
    copy = tmp_path / "copy" / "retrieval-head"
    for rel, entry in RETRIEVAL_HEAD.files.items():
        assert file_sha256(copy / rel) == entry.sha256

    victim = copy / RETRIEVAL_HEAD_HAYSTACK[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    assert main(["data", "verify", "niah", "--mirror", str(copy)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
