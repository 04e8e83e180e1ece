"""One checkpoint tar, checked before Composer opens it: the HMAC key, the digest, the member
check and the checked private copy. Shared by the resume (training/checkpoint.py) and the elastic
conversion (training/elastic.py) (docs/architecture.md, "Checkpoints and resume")."""
from __future__ import annotations

import hashlib
import hmac
import os
import posixpath
import tarfile
from typing import Optional

from dip_scale import storage

KEY_ENV = "DIP_SCALE_CHECKPOINT_KEY"


class CheckpointError(RuntimeError):
    """The save folder cannot be resumed from as it is; the message names files and the way out."""


class CheckpointRefused(CheckpointError):
    """A checkpoint failed authentication or holds unsafe members: nothing of it was opened."""


def checkpoint_key() -> Optional[bytes]:
    """The HMAC key from the environment (e.g. a Kubernetes Secret), never from YAML or logs."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode() if value else None


# --------------------------------------------------------------------------------------------
# Hashing and checking one tar
# --------------------------------------------------------------------------------------------
def hash_file(path: str, name: str, key: Optional[bytes], copy_to: Optional[str] = None) -> tuple[int, str, Optional[str]]:
    """One read of a local file -> (size, sha256, HMAC-SHA256 of name + bytes or None), copying
    it to `copy_to` on the way when given."""
    sha = hashlib.sha256()
    tag = hmac.new(key, name.encode() + b"\0", hashlib.sha256) if key else None
    size = 0
    out = open(copy_to, "wb") if copy_to else None
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                size += len(chunk)
                sha.update(chunk)
                if tag is not None:
                    tag.update(chunk)
                if out is not None:
                    out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return size, sha.hexdigest(), tag.hexdigest() if tag else None


def unsafe_members(path: str) -> list[str]:
    """Members Composer's `extractall` would write outside its folder, or that are not plain files
    or folders. Raises tarfile.TarError / EOFError for a tar that does not read to its end."""
    bad = []
    with tarfile.open(path) as t:
        for m in t.getmembers():
            parts = m.name.split("/")
            if m.name.startswith("/") or posixpath.isabs(m.name) or ".." in parts:
                bad.append(f"{m.name} (outside the checkpoint)")
            elif not (m.isfile() or m.isdir()):
                bad.append(f"{m.name} ({'link' if m.issym() or m.islnk() else 'device or special file'})")
    return bad


# --------------------------------------------------------------------------------------------
# Fetching and checking on every rank
# --------------------------------------------------------------------------------------------
def fetch(cand, rank: int, local_dir: str, key: Optional[bytes]) -> tuple[str, str]:
    """Copy rank's tar of `cand` into local_dir and check it -> ("ok" | "damaged" | "forged", path or why)."""
    name = cand.step.tar(rank)
    src = cand.tars.get(rank)
    if src is None:
        return "damaged", f"{name}: missing"
    return fetch_checked(src, name, ((cand.manifest or {}).get("tars") or {}).get(name), local_dir, key)


def fetch_checked(src: str, name: str, rec: Optional[dict], local_dir: str, key: Optional[bytes]) -> tuple[str, str]:
    """Copy `src` to local_dir/name while hashing it, check it against its record (size, sha256,
    HMAC when a key is set) and as a tar -> ("ok", local path) | ("damaged" | "forged", why)."""
    dst = os.path.join(local_dir, name)
    try:
        if storage.is_s3(src):
            storage.download_file(src, dst + ".part")
            size, sha, tag = hash_file(dst + ".part", name, key)
        else:  # a private copy: what is checked is what Composer opens
            size, sha, tag = hash_file(src, name, key, copy_to=dst + ".part")
    except OSError as e:
        discard(dst + ".part")
        return "damaged", f"{src}: cannot be read ({e})"
    if rec is not None:
        if size != rec.get("size") or sha != rec.get("sha256"):
            discard(dst + ".part")
            return "damaged", f"{src}: {size} bytes with sha256 {sha[:12]}..., the manifest records {rec.get('size')} bytes, {str(rec.get('sha256'))[:12]}..."
        if key is not None and not hmac.compare_digest(str(rec.get("hmac")), tag):
            discard(dst + ".part")
            return "forged", f"{src}: its authentication tag does not match ({KEY_ENV}): refused before anything in it was opened"
    try:
        bad = unsafe_members(dst + ".part")
    except (tarfile.TarError, EOFError, OSError) as e:
        discard(dst + ".part")
        return "damaged", f"{src}: not a complete tar ({type(e).__name__}: {e})"
    if bad:
        discard(dst + ".part")
        return "forged", f"{src}: refused: members {', '.join(bad[:5])}"
    os.replace(dst + ".part", dst)
    return "ok", dst


def discard(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
