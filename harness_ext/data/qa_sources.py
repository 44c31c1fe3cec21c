"""The pinned upstreams of the study's other two tasks: MuSiQue-Answerable and the SummHay haystacks.

Only checksums and locations live here, never the data (see :mod:`harness_ext.data.sources` for how a
:class:`~harness_ext.data.sources.Source` is fetched, verified, cached and mirrored).

* MuSiQue v1.0 (Trivedi et al., TACL 2022; CC BY 4.0). The authors publish one Google Drive zip
  (``musique_v1.0.zip``, file id ``1tGdADlNjWFaHLeZZGShh2IRcpO6Lv24h``, linked from the README of
  github.com/StonyBrookNLP/musique at 922ac98f); Drive has no stable direct-download URL, so the files are
  downloaded from the Hugging Face copy ``dgslibisey/MuSiQue`` at a pinned revision and checked against the
  SHA-256 and size of the *official* files. Those checksums were not computed here (this machine reaches
  neither host): they are the values several independent public projects record for the zip's
  ``data/musique_ans_v1.0_{dev,train}.jsonl`` (one states it compared the mirror's dev file with the zip's
  byte for byte), and they agree with each other. A mirror folder built from the zip (its two files at the
  folder's root) verifies the same way.
* SummHay (Laban et al., EMNLP 2024): ``data/topic_{news,conv}{1..5}.json`` of
  github.com/salesforce/summary-of-a-haystack at commit 43531729. The repository's tree records each file's
  git blob id, which pins bytes and size together; the ids below were read from that commit's tree here
  (``git ls-tree``), the file bytes were not (the snapshot left the large blobs out).
"""

from __future__ import annotations

import os

from harness_ext.data.sources import FileEntry, Source

# ---------------------------------------------------------------------------------- MuSiQue
MUSIQUE_REVISION = "c8f4f8c9465fb69d31a8eae894c3fd509c4ca321"  # dgslibisey/MuSiQue, 2023-06-16
MUSIQUE_DEV = "musique_ans_v1.0_dev.jsonl"  # 2,417 answerable questions: what the tasks score
MUSIQUE_TRAIN = "musique_ans_v1.0_train.jsonl"  # 19,938 questions: the real-data baseline's pool, never scored
MUSIQUE_OFFICIAL_ZIP = {
    "name": "musique_v1.0.zip",
    "google_drive_id": "1tGdADlNjWFaHLeZZGShh2IRcpO6Lv24h",
    "sha256": "98f839bf2fd5319f5c688aed77901a6d5c30b3b9f9f691ab9a8ecafb045ee0cd",
    "size": 272_049_578,
    "repository": "github.com/StonyBrookNLP/musique @ 922ac98f19a201998dbdae6d7f2887a5258dbdeb",
}

MUSIQUE = Source(
    name="musique",
    description="MuSiQue-Ans v1.0 (huggingface.co/datasets/dgslibisey/MuSiQue, the official files' bytes)",
    revision=MUSIQUE_REVISION,
    default_base_url=(
        os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        + f"/datasets/dgslibisey/MuSiQue/resolve/{MUSIQUE_REVISION}"
    ),
    base_url_env="NEEDLES_MUSIQUE_BASE_URL",
    mirror_env="NEEDLES_MUSIQUE_MIRROR",
    mirror_key="musique_mirror",
    files={
        MUSIQUE_DEV: FileEntry("15fa63794d18a94ce12411aca6e2327e65b6e83b0b1490efab3f1962e48abf3b", 30_439_728),
        MUSIQUE_TRAIN: FileEntry("83a75b1e11e4e9bb8f8308e72ac40ca617ae4431b3a0d955b61cab259248490a", 241_046_755),
    },
    hub_offline_envs=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
    cli_name="musique",
)

# ---------------------------------------------------------------------------------- SummHay
SUMMHAY_COMMIT = "43531729bc39fdc301bcc9ff7b26c5e6ce3fbf57"
_SUMMHAY_BLOBS = {
    "news1": "53dc8c2b88f61f71b2872fe338a3c8befa36a217",
    "news2": "a802f1fd7c2576b16409f99f3f2575d8ef9a9050",
    "news3": "6ba0a002bb929be7e31e3d23de70e11e989078b3",
    "news4": "b6de1c066aa044a6b77726f112d1cc8d86d15b09",
    "news5": "1a4bbf6da204460354b9462df0a24da73928d590",
    "conv1": "448e1481e3080f46332c2280abd9bdd0c7329b34",
    "conv2": "7828b65f6eacac54abce7b06432ab53be45385d5",
    "conv3": "259d18f5f90682f38017d7d997c6fec3823af9e4",
    "conv4": "488a687809251ab42a903ac19e42cdb987c6a76a",
    "conv5": "fe0f6f0662c22791e68b20d687cb392a69fb595e",
}
SUMMHAY_HAYSTACKS = tuple(_SUMMHAY_BLOBS)


def summhay_path(haystack: str) -> str:
    """The repository path of one haystack: ``news1`` -> ``data/topic_news1.json``."""
    return f"data/topic_{haystack}.json"


SUMMHAY = Source(
    name="summhay",
    description="github.com/salesforce/summary-of-a-haystack",
    revision=SUMMHAY_COMMIT,
    default_base_url=f"https://raw.githubusercontent.com/salesforce/summary-of-a-haystack/{SUMMHAY_COMMIT}",
    base_url_env="NEEDLES_SUMMHAY_BASE_URL",
    mirror_env="NEEDLES_SUMMHAY_MIRROR",
    mirror_key="summhay_mirror",
    files={summhay_path(h): FileEntry(None, None, git_blob_sha1=blob) for h, blob in _SUMMHAY_BLOBS.items()},
    cli_name="summhay",
)
