"""The cached base image the hosts boot from, built by ``lab/build-image`` once per recipe."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from .common import BUILD_IMAGE, LAB_ROOT, log, run


def image_mirror() -> str:
    """The Debian mirror apt on this machine already uses (debootstrap then needs no new source)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if line.startswith("deb ") and "bookworm" in words:
                    return next(w for w in words[1:] if "://" in w)
                if line.startswith("URIs:") and "/debian" in line and "security" not in line:
                    return words[1]
    return "http://deb.debian.org/debian"


def image_key(distro: str) -> str:
    """The image's cache folder: its release and the first 16 hex digits of the recipe's hash."""
    return f"{distro}-{hashlib.sha256(BUILD_IMAGE.read_bytes()).hexdigest()[:16]}"


def ensure_image(distro: str) -> Path:
    """The cached base image of `distro` for the current recipe, built under a lock if missing."""
    key = image_key(distro)
    images = LAB_ROOT / "image"
    images.mkdir(parents=True, exist_ok=True)
    image = images / key
    # One lock per image: labs of one release wait for its build, not for another release's.
    with (images / f".{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image / "rootfs" / "etc" / "os-release").exists():
            return image / "rootfs"
        log(f"building the base image {key} (about 2-3 min, once per recipe and release)")
        started = time.monotonic()
        tmp = images / f"{key}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        run(BUILD_IMAGE, tmp / "rootfs", image_mirror(), distro, stdout=subprocess.DEVNULL)
        if image.exists():
            shutil.rmtree(image)
        tmp.rename(image)
        log(f"image {key} built in {time.monotonic() - started:.0f}s")
        prune_images(keep=image)
        return image / "rootfs"


def prune_images(keep: Path) -> None:
    """Remove images of older recipes that no lab on this machine still runs on (the current
    recipe's images of other releases stay: they are as current as this one)."""
    recipe = keep.name.rsplit("-", 1)[-1]
    in_use = {keep}
    for saved in LAB_ROOT.glob("*/lab.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            in_use.add(Path(json.loads(saved.read_text())["image"]).parent)
    for old in keep.parent.iterdir():
        current = old.name.endswith(f"-{recipe}")
        if old.is_dir() and old not in in_use and not current and not old.name.endswith(".tmp"):
            log(f"removing the unused image {old.name}")
            shutil.rmtree(old)
