"""Official data files: verified download, cache, offline mirror, and the marking of non-official data.

A :class:`Source` is a pinned upstream (a git commit, a Hugging Face revision) with the files the
plugin uses. :func:`fetch` returns a local, verified copy of one file:

1. A mirror folder (``Source.mirror_env`` or the ``Source.mirror_key`` metadata key) is used
   exclusively when set: the file must exist there under the same relative path. It is never
   topped up from the network.
2. Otherwise the per-revision cache (``<cache>/data/<source>/<revision>/<path>``), else a download
   from ``Source.base_url_env`` (default: the pinned upstream URL) into that cache.

Every file is checked against the size and SHA-256 pinned below. A file that does not match is
refused, unless the caller opted in to non-official data (metadata ``allow_unofficial_data`` or
``NEEDLES_ALLOW_UNOFFICIAL_DATA=1``, for fixtures): then it is returned with ``official=False`` and
the task marks its alias and results metadata. Downloads are never accepted unverified, and
nothing falls back silently from one origin to another.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import truthy
from harness_ext.core.paths import cache_dir
from harness_ext.data.dataset_cache import file_sha256, git_blob_sha1

ALLOW_UNOFFICIAL_ENV = "NEEDLES_ALLOW_UNOFFICIAL_DATA"
ALLOW_UNOFFICIAL_KEY = "allow_unofficial_data"
FIXTURE_MARKER = "NEEDLES_FIXTURE.json"  # written at the root of every fixture mirror


@dataclass(frozen=True)
class FileEntry:
    sha256: str | None  # None: upstream publishes no checksum; the pinned revision is the only pin
    size: int | None
    # git's blob id (SHA-1 of "blob <size>\0" + bytes): what a repository records for a file when no SHA-256 is
    # published (SummHay); it pins the bytes and the size together.
    git_blob_sha1: str | None = None

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None or self.git_blob_sha1 is not None


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    revision: str
    default_base_url: str
    base_url_env: str
    mirror_env: str
    mirror_key: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    hub_offline_envs: tuple[str, ...] = ()  # env vars that forbid downloading (HF sources)
    cli_name: str = ""  # `needles data fetch <cli_name> --out DIR` writes DIR/<name>/...

    def base_url(self) -> str:
        return (os.environ.get(self.base_url_env) or self.default_base_url).rstrip("/")

    def label(self) -> str:
        return f"{self.description} @ {self.revision[:7]}"


# ---------------------------------------------------------------------------------- the sources
LITM_COMMIT = "29b8a6d042ce29abccee3db1a73171a107d7e6af"

# From the reference repository at LITM_COMMIT (see ../shared/data/lost-in-the-middle/MANIFEST.sha256):
# (sha256, size in bytes, path). Only checksums live here, never the data.
_LITM_MANIFEST = (
    ("6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e", 900334, "qa_data/nq-open-oracle.jsonl.gz"),
    (
        "69a8dd87a45f07fb3ed9b804917a89db975cd6e488682fc838edca029cc3881f",
        15151873,
        "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_0.jsonl.gz",
    ),
    (
        "c5e44700c4db24536f139f7383e3dd002413515ee889aeadc72767dd7f289682",
        15163003,
        "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_4.jsonl.gz",
    ),
    (
        "cbada411f70235afc47d9b5407e9358ad72eb021742402ff032c8b65076ffb2f",
        15155756,
        "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_9.jsonl.gz",
    ),
    (
        "86c1a25093615baefdd1ee4db7a993548b3bef24ca02eb9bd8db43fbedf517f2",
        15152418,
        "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_14.jsonl.gz",
    ),
    (
        "d79b715e1b8c8301335e93cb01659f68c24f0253a808c3190b06d21896506c6c",
        15114700,
        "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_19.jsonl.gz",
    ),
    (
        "192a05b27af2b09eec33ca0c94bb5cf82bcaf70d78b3bdff1258df34bf37aab9",
        7801797,
        "qa_data/10_total_documents/nq-open-10_total_documents_gold_at_0.jsonl.gz",
    ),
    (
        "f8425253dafc19cd9de31c06ab6c8b57d4da2bf48b8ea2d0790b805fb3aa1968",
        7806238,
        "qa_data/10_total_documents/nq-open-10_total_documents_gold_at_4.jsonl.gz",
    ),
    (
        "fab97badc6d69bae53c805bb198e8742a78ddf3c40a076989ef62891b76c997f",
        7774527,
        "qa_data/10_total_documents/nq-open-10_total_documents_gold_at_9.jsonl.gz",
    ),
    (
        "0500933e0957ee264a8bf57ca4cd58042124f222c814302dbe2e3af788ff4e95",
        22465103,
        "qa_data/30_total_documents/nq-open-30_total_documents_gold_at_0.jsonl.gz",
    ),
)

LOST_IN_THE_MIDDLE = Source(
    name="lost-in-the-middle",
    description="github.com/nelson-liu/lost-in-the-middle",
    revision=LITM_COMMIT,
    default_base_url=f"https://raw.githubusercontent.com/nelson-liu/lost-in-the-middle/{LITM_COMMIT}",
    base_url_env="NEEDLES_MDQA_BASE_URL",
    mirror_env="NEEDLES_MDQA_MIRROR",
    mirror_key="mdqa_mirror",
    files={path: FileEntry(sha, size) for sha, size, path in _LITM_MANIFEST},
    cli_name="mdqa",
)

FLENQA_REVISION = "d3ac83afb4dd5bcf1aad4fbfd2c85c13c1d97941"
FLENQA_FILE = "data/eval-00000-of-00001-e3c7225e84e4d34b.parquet"

FLENQA = Source(
    name="flenqa",
    description="huggingface.co/datasets/alonj/FLenQA (split eval)",
    revision=FLENQA_REVISION,
    default_base_url=(
        os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        + f"/datasets/alonj/FLenQA/resolve/{FLENQA_REVISION}"
    ),
    base_url_env="NEEDLES_FLENQA_BASE_URL",
    mirror_env="NEEDLES_FLENQA_MIRROR",
    mirror_key="flenqa_mirror",
    # The hub shows no checksum for this LFS file without network access; the revision pins it.
    files={FLENQA_FILE: FileEntry(None, None)},
    hub_offline_envs=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
    cli_name="flenqa",
)

RETRIEVAL_HEAD_COMMIT = "3ac171a6f71ce7ef1cda57d4215c390fb6ab51f2"
RETRIEVAL_HEAD_NEEDLES = "haystack_for_detect/needles.jsonl"
RETRIEVAL_HEAD_HAYSTACK = tuple(f"haystack_for_detect/part{i}/p1.txt" for i in (1, 2, 3))

# Wu et al.'s retrieval-head detection data at RETRIEVAL_HEAD_COMMIT (see ../shared/data/retrieval-head/
# MANIFEST.sha256, which stores needles.jsonl at its root): the needles and the book haystack of the NIAH tasks.
_RETRIEVAL_HEAD_MANIFEST = (
    ("2d973efa88888a6e9ed4eee3affad075b3775e5be3617ac895844cc3cfabf982", 936, RETRIEVAL_HEAD_NEEDLES),
    ("570e78e2d0a48a6c684129e48ea7e064ae1909d7a4172a4629a0ec15de5bba41", 262144, RETRIEVAL_HEAD_HAYSTACK[0]),
    ("5f49d44afe92dbbdc17d4b3c7ce50908bc978632a4346d44687074f67fa23077", 262144, RETRIEVAL_HEAD_HAYSTACK[1]),
    ("2bf4219730847657bd989a417eda5cf98c2d5f310dbdf65093a865c522b34cc8", 262144, RETRIEVAL_HEAD_HAYSTACK[2]),
)

RETRIEVAL_HEAD = Source(
    name="retrieval-head",
    description="github.com/nightdessert/Retrieval_Head",
    revision=RETRIEVAL_HEAD_COMMIT,
    default_base_url=f"https://raw.githubusercontent.com/nightdessert/Retrieval_Head/{RETRIEVAL_HEAD_COMMIT}",
    base_url_env="NEEDLES_NIAH_BASE_URL",
    mirror_env="NEEDLES_NIAH_MIRROR",
    mirror_key="niah_mirror",
    files={path: FileEntry(sha, size) for sha, size, path in _RETRIEVAL_HEAD_MANIFEST},
    cli_name="niah",
)

SOURCES = {s.name: s for s in (LOST_IN_THE_MIDDLE, FLENQA, RETRIEVAL_HEAD)}


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Resolved:
    path: Path
    relpath: str
    sha256: str
    official: bool
    origin: str  # "mirror" | "cache" | "download"
    label: str  # what the data is, as shown in results


def alias_mark(label: str) -> str:
    """The short marker appended to the alias of a task computed on non-official data."""
    return "NON-OFFICIAL DATA: fixture" if "FIXTURE" in label.upper() else "NON-OFFICIAL DATA"


def allow_unofficial(metadata: dict | None = None) -> bool:
    return truthy((metadata or {}).get(ALLOW_UNOFFICIAL_KEY, False)) or truthy(os.environ.get(ALLOW_UNOFFICIAL_ENV, ""))


def mirror_root(source: Source, metadata: dict | None = None) -> Path | None:
    value = (metadata or {}).get(source.mirror_key) or os.environ.get(source.mirror_env)
    return Path(str(value)).expanduser().resolve() if value else None


def fixture_label(root: Path) -> str | None:
    """The label of a fixture mirror (its marker file), or None for an ordinary folder."""
    marker = root / FIXTURE_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8")).get("label") or "fixture")
    except (OSError, ValueError):
        return "fixture (unreadable marker)"


def _mismatch(entry: FileEntry, path: Path, sha: str) -> str | None:
    """Why ``path`` is not the pinned file, or None when it is (or nothing is pinned)."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"size {size} bytes, expected {entry.size}"
    if entry.sha256 is not None and sha != entry.sha256:
        return f"SHA-256 {sha}, expected {entry.sha256}"
    if entry.git_blob_sha1 is not None and (blob := git_blob_sha1(path)) != entry.git_blob_sha1:
        return f"git blob id {blob}, expected {entry.git_blob_sha1}"
    return None


def mismatch(entry: FileEntry, path: Path) -> str | None:
    """Why the file at ``path`` is not the pinned one (size, SHA-256, git blob id), or None when it is."""
    return _mismatch(entry, path, file_sha256(path))


# ---------------------------------------------------------------------------------- fetch
def fetch(source: Source, relpath: str, metadata: dict | None = None, progress: bool = True) -> Resolved:
    """A verified local copy of ``relpath`` of ``source`` (see the module docstring for the rules)."""
    entry = source.files.get(relpath)
    if entry is None:
        raise NeedlesError(
            f"{relpath} is not a file of {source.label()}", fix="known files: " + ", ".join(source.files)
        )
    root = mirror_root(source, metadata)
    if root is not None:
        return _from_mirror(source, relpath, entry, root, metadata)
    target = cache_dir("data", source.name, source.revision) / relpath
    if target.is_file():
        sha = file_sha256(target)
        if _mismatch(entry, target, sha) is None:
            return Resolved(target, relpath, sha, True, "cache", source.label())
        target.unlink()  # a damaged or foreign cache entry is replaced, never trusted
    _download(source, relpath, entry, target, progress)
    return Resolved(target, relpath, file_sha256(target), True, "download", source.label())


def _from_mirror(source: Source, relpath: str, entry: FileEntry, root: Path, metadata: dict | None) -> Resolved:
    path = root / relpath
    how = f"{source.mirror_key} / {source.mirror_env}"
    if not path.is_file():
        raise NeedlesError(
            f"the data mirror {root} ({how}) has no {relpath}; nothing is downloaded while a mirror is set",
            fix=f"copy the official file to {path} (same relative path as {source.base_url()}/{relpath}), "
            f"e.g. `needles data fetch {source.cli_name} --out D` on a connected machine writes "
            f"D/{source.name}/..., "
            "or unset the mirror",
        )
    sha = file_sha256(path)
    problem = _mismatch(entry, path, sha)
    label = fixture_label(root)
    if problem is None and (entry.pinned or label is None):
        # The pinned bytes (even inside a fixture folder), or an unpinned file in an ordinary mirror.
        return Resolved(path, relpath, sha, True, "mirror", source.label())
    why = problem or f"the mirror is marked as a fixture ({FIXTURE_MARKER}: {label})"
    if not allow_unofficial(metadata):
        raise NeedlesError(
            f"{path} is not the official {relpath} of {source.label()}: {why}",
            fix=f"put the official file there (`needles data fetch {source.cli_name} --out D` writes "
            f"D/{source.name}/...), "
            "or, for test data such as a fixture, opt in "
            f"explicitly with --metadata '{{\"{ALLOW_UNOFFICIAL_KEY}\": true}}' or {ALLOW_UNOFFICIAL_ENV}=1 "
            "(results are then marked as non-official)",
        )
    return Resolved(path, relpath, sha, False, "mirror", label or f"unverified local data ({why})")


def _download(source: Source, relpath: str, entry: FileEntry, target: Path, progress: bool) -> None:
    url = f"{source.base_url()}/{relpath}"
    offline = [v for v in source.hub_offline_envs if truthy(os.environ.get(v, ""))]
    mirror_fix = (
        f'set {source.mirror_env} (or --metadata \'{{"{source.mirror_key}": "DIR"}}\') to a folder holding the '
        f"official files under their relative paths (`needles data fetch {source.cli_name} --out D` on a connected "
        f"machine writes D/{source.name}/...)"
    )
    if offline:
        raise NeedlesError(
            f"{relpath} of {source.label()} is not cached and {'/'.join(offline)} forbids downloading it",
            fix=mirror_fix + f", or unset {'/'.join(offline)} to download it once from {url}",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, entry.size, progress)
        problem = _mismatch(entry, tmp, file_sha256(tmp))
        if problem is not None:
            raise NeedlesError(
                f"the download of {url} is not the pinned file: {problem}; it was discarded",
                fix="retry; if it persists the server does not serve the pinned file: " + mirror_fix,
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, expected_size: int | None, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "lm-eval-needles"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - https/http by design
            announced = int(response.headers.get("Content-Length") or 0) or None
            total = expected_size or announced
            done, next_report = 0, 0.0
            if progress:
                print(f"[needles] downloading {url}", file=sys.stderr)
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if progress and total and done / total >= next_report:
                    print(f"[needles]   {done / 1e6:.1f} / {total / 1e6:.1f} MB", file=sys.stderr)
                    next_report += 0.25
            if announced is not None and done < announced:
                # http.client returns a short body without raising when the server closes early
                raise http.client.IncompleteRead(b"", announced - done)
    except urllib.error.HTTPError as exc:
        raise NeedlesError(
            f"cannot download {url}: HTTP {exc.code} {exc.reason}",
            fix="check the base URL (NEEDLES_*_BASE_URL) or use an offline mirror: see README, 'Offline data mirror'",
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NeedlesError(
            f"cannot download {url}: {type(exc).__name__}: {reason}",
            fix="check the network (or the base URL in NEEDLES_*_BASE_URL), or use an offline mirror: "
            "see README, 'Offline data mirror'",
        ) from None


def write_mirror(source: Source, relpaths: list[str], out: Path, metadata: dict | None = None) -> list[Resolved]:
    """Fetch ``relpaths`` (verified) and copy them into ``out`` under the same relative paths."""
    import shutil

    written = []
    for rel in relpaths:
        got = fetch(source, rel, metadata)
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not (dest.is_file() and file_sha256(dest) == got.sha256):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
            os.close(fd)
            shutil.copyfile(got.path, tmp)
            os.replace(tmp, dest)
        written.append(got)
    return written
