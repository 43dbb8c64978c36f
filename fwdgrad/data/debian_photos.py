"""41 more real colour photographs, from two Debian packages: scenes independent of the bundled seven.

The bundled photos (fwdgrad.data.photos) are only seven scenes, so a measurement on their crops could be a
property of those scenes. OpenCV's documentation package ships the photos its examples are run on
(fruit, a squirrel, a dog, a baboon, street scenes with text, buildings, ...) and MATE's backgrounds
package ships nature photographs; together they are a second, larger evaluation set that no calibration
here has seen. Renders, drawings, paintings, greyscale images and the second view of stereo pairs are
left out.

Nothing is installed system-wide: the two .deb files are fetched with ``apt-get download`` (no root
needed), only the listed images are unpacked into the data cache, and the .deb files are deleted.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import skimage.io

from .base import cache_dir

# package -> (folder inside the package, the natural colour photos under it)
PACKAGES = {
    "opencv-doc": ("usr/share/doc/opencv-doc/examples", (
        "data/aero1.jpg", "data/aloeL.jpg", "data/apple.jpg", "data/baboon.jpg", "data/board.jpg",
        "data/building.jpg", "data/butterfly.jpg", "data/chicky_512.png", "data/ela_original.jpg",
        "data/fruits.jpg", "data/graf1.png", "data/home.jpg", "data/leuvenA.jpg", "data/licenseplate_motion.jpg",
        "data/messi5.jpg", "data/orange.jpg", "data/rubberwhale1.png", "data/squirrel_cls.jpg", "data/stuff.jpg",
        "alphamat/input_images/plant.jpg", "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg",
        *(f"text/scenetext0{i}.jpg" for i in range(1, 7)))),
    "mate-backgrounds": ("usr/share/backgrounds/mate", tuple(f"nature/{name}.jpg" for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower"))),
}
SYSTEM_ROOT = Path("/")  # where the installed packages put their files
INSTALL = ("fwdgrad runs `apt-get download opencv-doc mate-backgrounds` on first use; if the package lists are "
           "missing run `sudo apt-get update` first, or install both: sudo apt-get install -y opencv-doc mate-backgrounds")


def photos_dir() -> Path:
    return cache_dir("data") / "debian-photos"


def _missing(root: Path) -> list[Path]:
    return [root / folder / photo for folder, photos in PACKAGES.values() for photo in photos
            if not (root / folder / photo).exists()]


def _fetch(target: Path) -> None:
    """Download both packages and unpack just the listed photos into ``target`` (atomically: a half-done
    fetch leaves nothing behind)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(f"the Debian photos need apt-get and dpkg-deb (a Debian or Ubuntu system): {INSTALL}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching the photos of Debian's {' and '.join(PACKAGES)} (about 140 MB of packages) into {target}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        unpacked = tmp / "photos"
        unpacked.mkdir()
        for package, (folder, photos) in PACKAGES.items():
            done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = list(tmp.glob(f"{package}_*.deb"))
            if done.returncode != 0 or not debs:
                raise FileNotFoundError(f"could not download the Debian package {package} "
                                        f"({done.stderr.strip()[-300:]}): {INSTALL}")
            members = [f"./{folder}/{photo}" for photo in photos]
            unpack = subprocess.run(f"dpkg-deb --fsys-tarfile '{debs[0]}' | tar -x -C '{unpacked}' " + " ".join(members),
                                    shell=True, capture_output=True, text=True)
            if unpack.returncode != 0:
                raise FileNotFoundError(f"{debs[0].name} does not hold the expected photos ({unpack.stderr.strip()[-300:]})")
            debs[0].unlink()
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)


@lru_cache(maxsize=1)
def debian_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8) for the 41 photos, in a fixed order: from the installed packages if both are
    installed, else from the data cache, fetched there on first use."""
    root = SYSTEM_ROOT
    if _missing(root):
        root = photos_dir()  # holds the packages' paths under it: <cache>/usr/share/...
        if _missing(root):
            _fetch(root)
    photos = []
    for folder, names in PACKAGES.values():
        for photo in names:
            image = skimage.io.imread(root / folder / photo)[..., :3]
            image.setflags(write=False)
            photos.append((Path(photo).stem, image))
    return tuple(photos)
