"""The MuSiQue and SummHay sources: verified download on a real HTTP server on 127.0.0.1, mirrors, refusals.

This machine reaches neither upstream, so the served bytes are the generated fixtures: for the mechanism
(download, verify, cache; a corrupted or cut file refused) the sources are re-pinned to the fixture's own
checksums; against the real pins every fixture byte is refused, by the library and by `needles data fetch`
(exit 2, the fix named, no traceback).
"""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from loopback import FileServer

from harness_ext.cli.app import main as cli_main
from harness_ext.core.errors import NeedlesError
from harness_ext.data.dataset_cache import file_sha256, git_blob_sha1
from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_DEV, SUMMHAY, summhay_path
from harness_ext.data.sources import FileEntry, fetch
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture

NEWS1 = summhay_path("news1")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa-src")
    write_musique_fixture(root / "musique", num_questions=3)
    write_summhay_fixture(root / "summhay", num_documents=6)
    return root


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = FileServer()
    for env in ("MUSIQUE", "SUMMHAY"):
        monkeypatch.setenv(f"NEEDLES_{env}_BASE_URL", srv.url)
        monkeypatch.delenv(f"NEEDLES_{env}_MIRROR", raising=False)
    for env in ("NEEDLES_ALLOW_UNOFFICIAL_DATA", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_git_blob_id_is_gits_own(fixtures):
    path = fixtures / "summhay" / NEWS1
    out = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_blob_sha1(path) == out.stdout.strip()


def test_download_verified_by_git_blob_id_and_corruption_refused(server, fixtures):
    body = (fixtures / "summhay" / NEWS1).read_bytes()
    pinned = dataclasses.replace(
        SUMMHAY, files={NEWS1: FileEntry(None, None, git_blob_sha1=git_blob_sha1(fixtures / "summhay" / NEWS1))}
    )
    server.files[NEWS1] = body
    got = fetch(pinned, NEWS1, progress=False)
    assert got.official and got.origin == "download" and got.path.read_bytes() == body
    assert fetch(pinned, NEWS1, progress=False).origin == "cache"
    got.path.unlink()
    server.files[NEWS1] = body.replace(b"site", b"Site", 1)  # one byte, same size
    with pytest.raises(NeedlesError, match="git blob id .* expected") as e:
        fetch(pinned, NEWS1, progress=False)
    assert "discarded" in e.value.problem and "NEEDLES_SUMMHAY_MIRROR" in e.value.fix
    assert not got.path.exists()


def test_download_verified_by_sha256_and_a_cut_file_refused(server, fixtures):
    path = fixtures / "musique" / MUSIQUE_DEV
    pinned = dataclasses.replace(MUSIQUE, files={MUSIQUE_DEV: FileEntry(file_sha256(path), path.stat().st_size)})
    server.files[MUSIQUE_DEV] = path.read_bytes()[:-10]
    with pytest.raises(NeedlesError, match="size .* expected"):
        fetch(pinned, MUSIQUE_DEV, progress=False)
    server.files[MUSIQUE_DEV] = path.read_bytes()
    assert fetch(pinned, MUSIQUE_DEV, progress=False).sha256 == file_sha256(path)


def test_the_real_pins_refuse_fixture_bytes_cli_exit_2(server, fixtures, capsys):
    server.files[MUSIQUE_DEV] = (fixtures / "musique" / MUSIQUE_DEV).read_bytes()
    with pytest.raises(NeedlesError, match="not the pinned file: size"):
        fetch(MUSIQUE, MUSIQUE_DEV, progress=False)
    for rel in SUMMHAY.files:
        server.files[rel] = (fixtures / "summhay" / rel).read_bytes()
    assert cli_main(["data", "fetch", "summhay"]) == 2
    err = capsys.readouterr().err
    assert "needles: error:" in err and "git blob id" in err and "fix:" in err and "Traceback" not in err


def test_verify_reports_a_fixture_mirror_as_not_official(fixtures, capsys):
    assert cli_main(["data", "verify", "summhay", "--mirror", str(fixtures / "summhay")]) == 1
    out = capsys.readouterr().out
    assert "FIXTURE" in out and out.count("MISMATCH") == 10
    assert cli_main(["data", "verify", "musique", "--mirror", str(fixtures / "musique")]) == 1
    out = capsys.readouterr().out
    assert out.count("MISMATCH") == 2  # dev and the (present) train file
