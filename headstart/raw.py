"""What the raw data is right now: each file's sha256, read by the raw stage and by `headstart status`.

DVC cannot see files outside the project (Debian's Fashion-MNIST) or named only by a param, so
the raw stage fingerprints them on every run; hashing about 30 MB takes well under a second.
"""

from __future__ import annotations

from headstart.config import DataParams
from headstart.fingerprint import sha256_file
from headstart.fmnist import OFFICIAL_MD5, SYSTEM_DIR, idx_files
from headstart.folder import damaged_checkout, scan_folder
from headstart.records import RawRecord, absolute


def fmnist_fingerprint(params: DataParams) -> tuple[str, dict[str, str]]:
    """Where the IDX files are read from and their sha256 (or the pinned md5s a download is verified by)."""
    root = absolute(str(params.root)) if params.root is not None else SYSTEM_DIR
    files = idx_files(root)
    if files is not None:
        return ("root" if params.root is not None else "system"), {p.name: sha256_file(p) for p in files.values()}
    if params.root is not None:
        raise FileNotFoundError(f"{root}: data.root lacks the Fashion-MNIST IDX files (train/t10k images and labels)")
    return "download", {name: f"md5:{md5}" for name, md5 in OFFICIAL_MD5.items()}


def raw_record(params: DataParams, with_source: bool = True) -> RawRecord:
    """Fingerprint the files the data stage will read: Fashion-MNIST when a task comes from it, the image folder."""
    origin, fmnist = "none", {}
    if with_source or params.image_folder is None:
        origin, fmnist = fmnist_fingerprint(params)
    folder = None
    if params.image_folder is not None:
        path = absolute(str(params.image_folder))
        damaged = damaged_checkout(path)
        if damaged:
            raise ValueError(
                f"{len(damaged)} file(s) of {path} are damaged copies: " + "; ".join(damaged[:10]) + ". Delete each "
                "damaged object, then `dvc fetch` it from a remote, or put the original file back and `dvc add` again"
            )
        folder = {i.path: sha256_file(path / i.path) for i in scan_folder(path).images}
    return RawRecord(fmnist_origin=origin, fmnist=dict(sorted(fmnist.items())), image_folder=folder)
