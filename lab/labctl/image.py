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


def ensure_image() -> Path:
    """The cached base image for the current recipe, built under a lock if missing."""
    recipe = hashlib.sha256(BUILD_IMAGE.read_bytes()).hexdigest()[:16]
    images = LAB_ROOT / "image"
    images.mkdir(parents=True, exist_ok=True)
    image = images / recipe
    with (images / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image / "rootfs" / "etc" / "os-release").exists():
            return image / "rootfs"
        log(f"building the base image {recipe} (about 90 s, once per recipe)")
        started = time.monotonic()
        tmp = images / f"{recipe}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        run(BUILD_IMAGE, tmp / "rootfs", image_mirror(), stdout=subprocess.DEVNULL)
        if image.exists():
            shutil.rmtree(image)
        tmp.rename(image)
        log(f"image built in {time.monotonic() - started:.0f}s")
        prune_images(keep=image)
        return image / "rootfs"


def prune_images(keep: Path) -> None:
    """Remove images of older recipes that no lab on this machine still runs on."""
    in_use = {keep}
    for saved in LAB_ROOT.glob("*/lab.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            in_use.add(Path(json.loads(saved.read_text())["image"]).parent)
    for old in keep.parent.iterdir():
        if old.is_dir() and old not in in_use and not old.name.endswith(".tmp"):
            log(f"removing the unused image {old.name}")
            shutil.rmtree(old)
