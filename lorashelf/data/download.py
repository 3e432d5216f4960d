"""Fetch one file listed on a PyPI-style simple index: resumable, sha256-verified.

The BIG-bench sdist (``bigbench==1.0.0``) cannot go through pip (pip >= 26 refuses its
legacy build), so it is fetched as a plain file: the index is asked through the JSON
simple API of PEP 691 (``Accept: application/vnd.pypi.simple.v1+json``) for the
file's url and sha256, the bytes land in ``NAME.part`` (resumed with an HTTP range
request when interrupted) and become ``NAME`` only once the hash matches. A ``.part``
that another process is still growing is waited for, never downloaded twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError

CHUNK = 1 << 20
JSON_API = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    url: str
    sha256: str
    size: int | None = None


def find_file(index_url: str, project: str, filename: str, timeout: float = 60) -> RemoteFile:
    """Look ``filename`` up on ``{index_url}/{project}/`` through the PEP 691 JSON API."""
    page = f"{index_url.rstrip('/')}/{project}/"
    try:
        with urlopen(Request(page, headers={"Accept": JSON_API}), timeout=timeout) as r:
            listing = json.load(r)
    except (URLError, OSError, json.JSONDecodeError) as e:
        raise LorashelfError(
            f"cannot read the package index {page} ({e}); check the network or "
            f"pass --sdist PATH to a downloaded {filename}"
        ) from None
    for f in listing.get("files", []):
        if f.get("filename") == filename and f.get("hashes", {}).get("sha256"):
            url = urljoin(page, f["url"])
            return RemoteFile(filename, url, f["hashes"]["sha256"], f.get("size"))
    raise LorashelfError(
        f"{filename} (with a sha256) is not listed on {page}; try another --index-url"
    )


def byte_bar(desc: str, total: int | None = None, *, progress: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar counting bytes (KiB/MiB units)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress, **kw)  # fmt: skip


def sha256_of(path: Path, progress: bool = True) -> str:
    h = hashlib.sha256()
    with (
        open(path, "rb") as f,
        byte_bar(
            f"checking {path.name}", path.stat().st_size, progress=progress, leave=False
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def wait_while_growing(part: Path, quiet: float = 15.0, poll: float = 2.0) -> None:
    """Block while another process appends to ``part`` (changed within ``quiet`` s)."""
    bar = None
    while part.exists() and time.time() - part.stat().st_mtime < quiet:
        if bar is None:
            bar = byte_bar(f"waiting for another download of {part.name}")
        bar.n = part.stat().st_size
        bar.refresh()
        time.sleep(poll)
    if bar is not None:
        bar.close()


def fetch(remote: RemoteFile, dest: Path, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``remote`` to ``dest`` unless a verified copy is there already."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    wait_while_growing(part)
    if dest.is_file() and sha256_of(dest, progress) == remote.sha256:
        return dest
    if not (remote.size and part.is_file() and part.stat().st_size == remote.size):
        download(remote.url, part, remote.size, progress, timeout)
    got = sha256_of(part, progress)
    if got != remote.sha256:
        part.unlink()
        raise LorashelfError(
            f"{remote.filename}: sha256 {got} does not match the index's {remote.sha256}; "
            "the partial file was removed, run the pull again"
        )
    os.replace(part, dest)
    return dest


def download(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> None:
    """Append ``url``'s bytes to ``part``, resuming from its length when the server can."""
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code != 416:
            raise LorashelfError(f"download of {url} failed: HTTP {e.code}; try again") from None
        resp, have = urlopen(Request(url), timeout=timeout), 0
    except (URLError, OSError) as e:
        raise LorashelfError(
            f"download of {url} failed ({e}); run the pull again to resume"
        ) from None
    if resp.status != 206:
        have = 0  # the server ignored the range: start over
    with (
        resp,
        open(part, "ab" if have else "wb") as f,
        byte_bar(part.name.removesuffix(".part"), size, progress=progress, initial=have) as bar,
    ):
        try:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        except OSError as e:
            raise LorashelfError(
                f"download of {url} broke off ({e}); run the pull again to resume"
            ) from None
