"""SeqGAN's oracle parameters (``target_params_py3.pkl``): a local file, or SeqGAN's published
copy downloaded once, checked for size and SHA-256 and kept in a cache folder.

``seqgan_oracle_path("seqgan")`` returns that file; any other spec is a path to the parameters.
``python -m rlgaf_fast.bench.seqgan_data`` downloads it and prints where it is. Environment:

- ``RLGAF_SEQGAN_ORACLE``: a local copy of the file (for machines without network); "seqgan"
  then reads it, checked like a download, and never downloads. The tests find the file here.
- ``RLGAF_FAST_CACHE``: the cache folder (default ``~/.cache/rlgaf_fast``); the download is
  kept as ``seqgan/target_params_py3.pkl`` under it, the default of ``RLGAF_SEQGAN_ORACLE``.
- ``RLGAF_SEQGAN_ORACLE_URL``: where to download from (default ``ORACLE_URL``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# save/target_params_py3.pkl of LantaoYu/SeqGAN at a fixed commit, so the bytes cannot change.
ORACLE_URL = (
    "https://raw.githubusercontent.com/LantaoYu/SeqGAN/"
    "aa79a6fff1c4127fd8d0e92df8b647cf48b30787/save/target_params_py3.pkl"
)
ORACLE_SIZE = 1_334_000
ORACLE_SHA256 = "5ac794a695dd6e0eb2bb689f3dfda55e4e0053e8c0399e6242630a95f1e60e8a"
ORACLE_ENV, CACHE_ENV, URL_ENV = (
    "RLGAF_SEQGAN_ORACLE",
    "RLGAF_FAST_CACHE",
    "RLGAF_SEQGAN_ORACLE_URL",
)
DOWNLOAD_COMMAND = "python -m rlgaf_fast.bench.seqgan_data"
_OFFLINE_HINT = (
    f"without network, download it elsewhere and pass its path (--oracle PATH) or set {ORACLE_ENV}"
)


def default_oracle_path() -> Path:
    """Where "seqgan" looks: ``$RLGAF_SEQGAN_ORACLE``, else the cache file the download fills."""
    local = os.environ.get(ORACLE_ENV)
    if local:
        return Path(local)
    cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlgaf_fast"
    return Path(cache) / "seqgan" / "target_params_py3.pkl"


def seqgan_oracle_path(spec: str | Path, *, download: bool = True) -> Path:
    """The SeqGAN oracle parameters that ``spec`` names: a path, returned unchanged once it is
    known to exist, or "seqgan": ``default_oracle_path()``, downloaded there first (from
    ``$RLGAF_SEQGAN_ORACLE_URL`` or ``ORACLE_URL``) when ``download`` and no local copy is
    named. Raises FileNotFoundError for a missing file or a failed download, ValueError for a
    file that is not SeqGAN's (size or SHA-256)."""
    if str(spec) != "seqgan":
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"oracle parameters {path} do not exist; give SeqGAN's target_params_py3.pkl, "
                "or 'seqgan' to download it"
            )
        return path
    path = default_oracle_path()
    if download and not os.environ.get(ORACLE_ENV):
        url = os.environ.get(URL_ENV) or ORACLE_URL
        return _fetch(url, path, size=ORACLE_SIZE, sha256=ORACLE_SHA256)
    if not path.is_file():
        raise FileNotFoundError(
            f"SeqGAN's oracle parameters are not at {path} ({ORACLE_ENV}, default: the cache "
            f"that `--oracle seqgan` fills): download them with `{DOWNLOAD_COMMAND}`, or set "
            f"{ORACLE_ENV} to a copy of target_params_py3.pkl"
        )
    problem = _mismatch(path.read_bytes(), ORACLE_SIZE, ORACLE_SHA256)
    if problem:
        raise ValueError(
            f"{path} is not SeqGAN's target_params_py3.pkl: {problem} (pass it as --oracle PATH "
            "to use it anyway)"
        )
    return path


def _mismatch(data: bytes, size: int, sha256: str) -> str | None:
    """What differs from the expected file, or None."""
    if len(data) != size:
        return f"expected {size} bytes, got {len(data)}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        return f"expected SHA-256 {sha256}, got {digest}"
    return None


def _fetch(url: str, dest: Path, *, size: int, sha256: str) -> Path:
    """``dest``, downloaded from ``url`` unless it already holds the expected bytes. The file
    appears only once verified (written to DEST.partial, then renamed); a file of another size
    or hash is a ValueError and is not kept."""
    if dest.is_file() and _mismatch(dest.read_bytes(), size, sha256) is None:
        return dest
    print(f"downloading {url} ({size / 1e6:.1f} MB) to {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(size + 1)  # one byte more reveals a larger file
    except urllib.error.HTTPError as error:
        raise FileNotFoundError(
            f"could not download {url}: HTTP {error.code} {error.reason}; {_OFFLINE_HINT}"
        ) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(f"could not download {url}: {reason}; {_OFFLINE_HINT}") from None
    problem = f"expected {size} bytes, got more" if len(data) > size else None
    problem = problem or _mismatch(data, size, sha256)
    if problem:
        raise ValueError(f"{url}: {problem}; the download was not kept")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, dest)
    return dest


if __name__ == "__main__":
    print(seqgan_oracle_path("seqgan"))
