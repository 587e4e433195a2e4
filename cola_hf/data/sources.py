"""Where data comes from: a URL (downloaded once, then served from `datasets`' cache), a local zip (extracted
and cached by `datasets`) or a local directory. Each data module (CoLA, its annotations, BLiMP) turns the
directory it gets into its own files.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from cola_hf.errors import ColaDataError, UsageError

# The releases' addresses, here rather than beside their readers: the options' defaults (cola_hf.config) need them,
# and importing the readers means importing `datasets`, most of a second that --help and bad input do without.
COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"  # the CoLA 1.1 release, from the CoLA site
BLIMP_URL = "https://github.com/alexwarstadt/blimp/raw/master/BLiMP.zip"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def download(url: str, cache_dir: str | None = None, *, check_for_updates: bool = True) -> Path:
    """The URL's file, extracted when it is an archive: downloaded once, then served from datasets' cache.

    With `check_for_updates`, every call asks the server whether the file changed (so it needs the network);
    without, a cached copy is used as it is, offline too. Raises OSError or ConnectionError (offline mode
    included) when it cannot be fetched.
    """
    import datasets

    download_config = datasets.DownloadConfig(cache_dir=cache_dir, use_etag=check_for_updates)
    return Path(datasets.DownloadManager(download_config=download_config).download_and_extract(url))


def local_root(
    path: Path,
    option: str = "--cola_source",
    expected: str = "the CoLA 1.1 zip or a directory of TSVs",
    error: type[UsageError] = ColaDataError,
) -> Path:
    """A local source given by `option`: a directory as it is, a zip extracted (and cached) by datasets.

    What is wrong with it raises `error`, the data set's own kind of UsageError.
    """
    try:
        if not path.exists():
            raise error(f"{path}: no such file or directory ({option})")
        if path.is_dir():
            return path
        with path.open("rb") as handle:  # open it first: is_zipfile calls an unreadable file "not a zip"
            if not zipfile.is_zipfile(handle):
                raise error(f"{path}: not a zip file; expected {expected}")
    except PermissionError as err:
        raise error(f"{err.filename}: cannot read ({err.strerror})") from err
    import datasets

    return Path(datasets.DownloadManager().extract(str(path)))
