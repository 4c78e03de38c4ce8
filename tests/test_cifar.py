"""The official CIFAR archive format, parsed from archives the tests write, served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import pytest

from cnnlab.config import DataConfig
from cnnlab.data import cifar, load_dataset
from cnnlab.errors import CnnlabError
from tests.conftest import write_cifar10_archive


def local_source(url: str, archive: Path) -> cifar.CifarSource:
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    return cifar.CifarSource(**{**cifar.CIFAR10.__dict__, "url": url, "md5": md5})


def test_download_verifies_extracts_and_parses(server, tmp_path):
    root, base = server
    source = local_source(f"{base}/good.tar.gz", write_cifar10_archive(root / "good.tar.gz"))
    dataset = cifar.load_cifar(source, tmp_path / "cache")
    assert len(dataset.train) == 100 and len(dataset.test) == 20
    assert dataset.image_shape == (3, 32, 32) and dataset.classes[0] == "c0"
    extracted = sorted(p.name for p in (tmp_path / "cache" / "cifar-10-batches-py").iterdir())
    assert extracted == sorted(cifar.CIFAR10.members)
    # the second load uses the cache: the server is no longer needed
    (root / "good.tar.gz").unlink()
    assert len(cifar.load_cifar(source, tmp_path / "cache").train) == 100


def test_checksum_mismatch_reports_both_hashes_and_keeps_nothing(server, tmp_path):
    root, base = server
    write_cifar10_archive(root / "good.tar.gz")
    source = cifar.CifarSource(**{**cifar.CIFAR10.__dict__, "url": f"{base}/good.tar.gz"})
    with pytest.raises(CnnlabError, match=f"expected {cifar.CIFAR10.md5}"):
        cifar.load_cifar(source, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "downloads").iterdir())


def test_truncated_download_is_an_error(server, tmp_path):
    root, base = server
    archive = write_cifar10_archive(root / "good.tar.gz")
    with pytest.raises(CnnlabError, match=r"download of .* failed|corrupt or truncated"):
        cifar.load_cifar(local_source(f"{base}/truncated.tar.gz", archive), tmp_path / "cache")
    assert not (tmp_path / "cache" / "downloads" / "truncated.tar.gz").exists()


def test_http_error_is_one_clear_line(server, tmp_path):
    _, base = server
    source = cifar.CifarSource(**{**cifar.CIFAR10.__dict__, "url": f"{base}/missing.tar.gz"})
    with pytest.raises(CnnlabError, match="HTTP 404"):
        cifar.load_cifar(source, tmp_path / "cache")


def test_local_archive_and_extracted_folder_load_through_data(tmp_path):
    archive = write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    from_archive = load_dataset(DataConfig(data=str(archive)))
    with tarfile.open(archive) as t:
        t.extractall(tmp_path / "x", filter="data")
    from_folder = load_dataset(DataConfig(data=str(tmp_path / "x")))
    assert (from_archive.train.images == from_folder.train.images).all()
    assert load_dataset(DataConfig(data=str(archive), image_size=16)).image_shape == (3, 16, 16)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar10_archive(archive)
    with tarfile.open(archive) as t:
        members = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": Payload(), b"labels": []})
    with tarfile.open(archive, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(CnnlabError, match="refused"):
        load_dataset(DataConfig(data=str(archive)))
    assert not marker.exists()
