#!/usr/bin/env python3
"""Build edgeml's OCI images (device or compiler, amd64 or arm64) from what this machine can install.

    python scripts/build_image.py                              # device image, amd64, Debian base made here
    python scripts/build_image.py --arch arm64                 # the arm64 variant (no emulation needed to build)
    python scripts/build_image.py --base python:3.11-slim      # with a registry: any Python 3.11 base image
    python scripts/build_image.py --kind compiler              # everything, for CI

Steps (each cached under --cache, default ~/.cache/edgeml):

1. base: ``--base debootstrap`` (default) makes a Debian bookworm root filesystem the way
   scripts/aarch64_proof.py does (``debootstrap --foreign --variant=minbase --include=python3``, the .debs
   unpacked with ``dpkg-deb -x``, no emulated second stage), in ``CACHE/rootfs/rootfs-bookworm-ARCH`` with the
   same ``.edgeml-rootfs-ok`` marker (``--rootfs-cache ~/.cache/edgeml/aarch64-proof`` shares the proof's arm64
   tree), and imports a slimmed copy (no apt lists, docs, locales) as ``localhost/edgeml-base:bookworm-ARCH``.
2. site: the edgeml wheel (built from this checkout) and its dependencies for ARCH, installed on the host with
   ``pip install --target --platform ... --only-binary=:all:`` (no pip, no compiler, no network in the image).
3. ``podman build --format docker`` of ``deploy/Containerfile.KIND`` with ``--build-arg BASE=...``. The
   Containerfiles have no RUN step, so the arm64 image builds on an amd64 host without qemu.

Prints the image's size (goal for the device image: <= 250 MB) and, with --json, one JSON object.
Exit codes: 0 built, 1 a step failed, 3 a tool is missing (podman, debootstrap, dpkg-deb).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
PY_TAG = "3.11"
EXIT_MISSING = 3
DEVICE_SIZE_GOAL_MB = 250
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Debian packages beyond python3 in the base: TVM's export_library links each compiled model with the host's
# g++ (the compiler image only; the device image never compiles).
ROOTFS_EXTRA_PACKAGES = {"device": [], "compiler": ["g++"]}
USER_ID = 10001
PLATFORMS = {"amd64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
             "arm64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]}
# Not shipped in the image: package manager state, docs, translations, test suites. Paths are relative to the
# root filesystem (tar --exclude patterns, anchored with ./).
ROOTFS_EXCLUDES = ["./var/lib/apt/lists/*", "./var/cache/apt/*", "./usr/share/doc/*", "./usr/share/man/*",
                   "./usr/share/info/*", "./usr/share/locale/*", "./usr/share/i18n/*", "./debootstrap",
                   "./proc/*", "./usr/lib/python3.11/test", "./usr/lib/python3.11/ensurepip",
                   "./usr/lib/python3.11/idlelib", "./usr/lib/python3.11/lib2to3", "./usr/lib/python3.11/pydoc_data",
                   "./usr/lib/*-linux-gnu/gconv"]  # glibc iconv modules: Python has its own codecs
# Inside the device site: compile-time parts of onnxruntime and test suites the runtime never imports.
DEVICE_SITE_PRUNE = ["onnxruntime/transformers", "onnxruntime/quantization", "onnxruntime/tools",
                     "numpy/_core/tests", "numpy/tests", "numpy/*/tests", "numpy/f2py", "numpy/typing/tests"]
PASSWD = f"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n" \
         f"edgeml:x:{USER_ID}:{USER_ID}:edgeml:/var/lib/edgeml:/usr/sbin/nologin\n"
GROUP = f"root:x:0:\nnogroup:x:65534:\nedgeml:x:{USER_ID}:\n"


class Missing(Exception):
    """A tool this build needs is not installed."""


class StepFailed(Exception):
    """One build step failed; the message says which and why."""


@dataclass
class BuildResult:
    image: str
    kind: str
    arch: str
    base: str
    size_bytes: int
    size_mb: float
    goal_mb: int | None
    within_goal: bool | None
    seconds: float


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise StepFailed(f"{what} failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n"
                         f"{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    return proc


def need_tools(*tools: str) -> None:
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise Missing(f"missing tools: {', '.join(missing)} (apt-get install podman debootstrap)")


def debian_mirror() -> str:
    """The first Debian mirror this machine's apt is configured with (same rule as aarch64_proof)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            m = re.match(r"^URIs:\s*(\S+)", line.strip()) or \
                re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line.strip())
            if m and "security" not in m.group(1) and m.group(1).startswith("http"):
                return m.group(1)
    return "http://deb.debian.org/debian"


def debootstrap_rootfs(arch: str, cache: Path, extra_packages: list[str]) -> Path:
    """A Debian minbase + python3 (+ EXTRA_PACKAGES) tree for ARCH, unpacked without a second stage; cached by
    its marker. The device tree (no extras) keeps the name and marker scripts/aarch64_proof.py shares."""
    suffix = "-" + "-".join(name.replace("+", "p") for name in extra_packages) if extra_packages else ""
    rootfs = cache / f"rootfs-{SUITE}-{arch}{suffix}"
    if (rootfs / ".edgeml-rootfs-ok").exists():
        log(f"rootfs: cached {rootfs}")
        return rootfs
    if os.geteuid() != 0:
        raise Missing("debootstrap needs root to build the base root filesystem (or pass --base IMAGE)")
    need_tools("debootstrap", "dpkg-deb")
    tmp = cache / f"rootfs-{SUITE}-{arch}{suffix}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    log(f"rootfs: debootstrap --foreign {arch} {SUITE} from {mirror}")
    include = ",".join(["python3", *extra_packages])
    run(["debootstrap", "--foreign", f"--arch={arch}", "--variant=minbase", f"--include={include}", SUITE,
         str(tmp), mirror], "debootstrap")
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        deb.unlink()
    for needed in ["python3.11", *extra_packages]:
        if not (tmp / "usr/bin" / needed).exists():
            raise StepFailed(f"the {arch} rootfs has no /usr/bin/{needed} after unpacking {len(debs)} packages")
    (tmp / ".edgeml-rootfs-ok").write_text(f"{SUITE} {mirror}" + (f" {include}" if extra_packages else "") + "\n")
    tmp.rename(rootfs)
    return rootfs


def prepare_rootfs_for_image(rootfs: Path) -> None:
    """Users the Containerfile's USER needs, and a sticky /tmp: base-passwd's postinst never ran."""
    etc = rootfs / "etc"
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        target = etc / name
        if not target.exists() or f":{USER_ID}:" not in target.read_text():
            tmp = etc / f".{name}.edgeml-tmp"
            tmp.write_text(text)
            tmp.rename(target)
    (rootfs / "tmp").mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def import_base(rootfs: Path, arch: str) -> str:
    """``podman import`` a slimmed copy of ROOTFS; the tag carries a hash of what went in, so it is reused."""
    prepare_rootfs_for_image(rootfs)
    key = hashlib.sha256(((rootfs / ".edgeml-rootfs-ok").read_text() + PASSWD + " ".join(ROOTFS_EXCLUDES))
                         .encode()).hexdigest()[:12]
    name = f"localhost/edgeml-base:{SUITE}-{arch}-{key}"
    if image_exists(name):
        log(f"base: cached {name}")
        return name
    log(f"base: podman import {rootfs} -> {name}")
    with tempfile.TemporaryDirectory(prefix="edgeml-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        excludes = [f"--exclude={pattern}" for pattern in ROOTFS_EXCLUDES]
        run(["tar", "-C", str(rootfs), "--numeric-owner", *excludes, "-cf", str(tarball), "."], "tar of the rootfs")
        run(["podman", "import", "--arch", arch, "--change", "CMD [\"/usr/bin/python3\"]", str(tarball), name],
            "podman import")
    return name


def requirement_lines(kind: str, source: Path) -> list[str]:
    """The wheels a KIND image needs: what SOURCE's pyproject.toml declares (base, plus the compiler extra for
    the compiler image), each pinned to the version this environment runs and tests where it is installed.

    Read from pyproject.toml, not from the installed edgeml's metadata: an editable install's metadata is
    only as new as its last ``pip install -e``, and the image must carry what the packaged wheel declares."""
    import tomllib
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's vendored copy: the script already needs pip
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]

    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    lines = list(project.get("dependencies", []))
    if kind == "compiler":
        lines += project.get("optional-dependencies", {}).get("compiler", [])
    target_env = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                  "python_version": PY_TAG, "python_full_version": f"{PY_TAG}.2",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    reqs = set()
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(target_env):
            continue
        name = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        reqs.add(f"{name}=={installed}" if installed and req.specifier.contains(installed, prereleases=True)
                 else f"{name}{req.specifier}")
    return sorted(reqs)


def torch_cpu_index(url: str, reqs: list[str]) -> list[str]:
    """pip options for PyTorch's CPU-only wheels: PyPI's Linux torch pulls multi-GB CUDA libraries.

    The index is used only when reachable (a 5 s probe): on a machine without it, pip's own configuration
    (find-links, a mirror) must supply the CPU wheel, and the torch pin (``+cpu`` when this environment runs
    the CPU build) makes pip fail clearly rather than fall back to the CUDA build."""
    import urllib.request

    if not url or not any(r.startswith("torch==") or r.startswith("torch>") for r in reqs):
        return []
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=5):
            return ["--extra-index-url", url]
    except OSError as exc:
        log(f"site: the PyTorch CPU index {url} is not reachable ({exc}); using pip's configured sources")
        return []


def install_site_deps(kind: str, arch: str, cache: Path, source: Path, torch_index: str) -> Path:
    """Dependencies (not edgeml itself) for ARCH into a cached --target folder."""
    reqs = requirement_lines(kind, source)
    key = hashlib.sha256(" ".join([kind, arch, *reqs, *PLATFORMS[arch]]).encode()).hexdigest()[:12]
    site = cache / f"site-{kind}-cp311-{arch}-{key}"
    if (site / ".edgeml-site-ok").exists():
        log(f"site: cached {site}")
        return site
    tmp = Path(str(site) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", PY_TAG, "--implementation", "cp", "--target", str(tmp)]
    for platform in PLATFORMS[arch]:
        cmd += ["--platform", platform]
    if kind == "compiler":
        cmd += torch_cpu_index(torch_index, reqs)
    log(f"site: pip install ({arch}) {len(reqs)} requirements")
    run(cmd + reqs, f"pip install of the {arch} wheels")
    if kind == "device":
        slim_device_site(tmp, arch)
    (tmp / ".edgeml-site-ok").write_text("\n".join(reqs) + "\n")
    tmp.rename(site)
    return site


def slim_device_site(site: Path, arch: str) -> None:
    """Drop what the runtime never loads and strip symbols: the device image's size goal depends on it."""
    for pattern in DEVICE_SITE_PRUNE:
        for path in site.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    capi = site / "onnxruntime" / "capi"
    pybind = next(capi.glob("onnxruntime_pybind11_state*.so"), None)
    # libonnxruntime.so is the C API for other languages; the Python module carries its own copy unless it
    # is linked against it (checked, so a future wheel that needs it keeps it).
    if pybind is not None and shutil.which("readelf"):
        needed = run(["readelf", "-d", str(pybind)], "readelf").stdout
        if "libonnxruntime.so" not in needed:
            for lib in capi.glob("libonnxruntime.so*"):
                lib.unlink()
    strip = shutil.which("strip" if arch == "amd64" else "aarch64-linux-gnu-strip")
    if strip is None:
        log(f"site: no strip for {arch} (binutils-aarch64-linux-gnu); shared objects keep their symbols")
        return
    for lib in [*site.rglob("*.so"), *site.rglob("*.so.*")]:
        # auditwheel's vendored libraries (*.libs/) were rewritten by patchelf; strip breaks their layout
        if lib.is_file() and not lib.is_symlink() and not lib.parent.name.endswith(".libs"):
            subprocess.run([strip, "--strip-unneeded", str(lib)], capture_output=True)


def build_context(source: Path, site_deps: Path, dest: Path) -> Path:
    """The build context: site/ = dependencies + the edgeml wheel of this checkout, and deploy/image/ files."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    wheels = dest / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(source)], "building the edgeml wheel")
    site = dest / "site"
    run(["cp", "-a", "--reflink=auto", str(site_deps), str(site)], "copying the site")
    (site / ".edgeml-site-ok").unlink(missing_ok=True)
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
         *map(str, wheels.glob("edgeml-*.whl"))], "installing the edgeml wheel")
    shutil.rmtree(wheels)
    shutil.copytree(REPO / "deploy" / "image", dest / "image")
    return dest


def image_size(name: str) -> int:
    proc = run(["podman", "image", "inspect", name, "--format", "{{.Size}}"], "podman image inspect")
    return int(proc.stdout.strip())


def build(args: argparse.Namespace) -> BuildResult:
    start = time.time()
    need_tools("podman")
    cache = Path(args.cache).expanduser()
    if args.base == "debootstrap":
        rootfs = debootstrap_rootfs(args.arch, Path(args.rootfs_cache).expanduser() if args.rootfs_cache
                                    else cache / "rootfs", ROOTFS_EXTRA_PACKAGES[args.kind])
        base = import_base(rootfs, args.arch)
    else:
        base = args.base
    site_deps = install_site_deps(args.kind, args.arch, cache / "image-site", Path(args.source).resolve(),
                                  args.torch_index)
    tag = args.tag or f"localhost/edgeml-{args.kind}:{version()}-{args.arch}"
    with tempfile.TemporaryDirectory(prefix="edgeml-image-", dir=cache) as tmp:
        context = build_context(Path(args.source).resolve(), site_deps, Path(tmp) / "context")
        log(f"build: podman build {tag} (base {base})")
        # a base made here exists only locally; a registry base is pulled for the requested platform
        pull = "--pull=never" if args.base == "debootstrap" else "--pull=missing"
        run(["podman", "build", "--format", "docker", "--platform", f"linux/{args.arch}", pull,
             "--build-arg", f"BASE={base}", "-f", str(REPO / "deploy" / f"Containerfile.{args.kind}"),
             "-t", tag, str(context)], "podman build")
    size = image_size(tag)
    goal = DEVICE_SIZE_GOAL_MB if args.kind == "device" else None
    size_mb = round(size / 1e6, 1)
    if args.oci_archive:
        run(["podman", "save", "--format", "oci-archive", "-o", args.oci_archive, tag], "podman save")
    return BuildResult(image=tag, kind=args.kind, arch=args.arch, base=base, size_bytes=size, size_mb=size_mb,
                       goal_mb=goal, within_goal=None if goal is None else size_mb <= goal,
                       seconds=round(time.time() - start, 1))


def version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else "0.0.0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["device", "compiler"], default="device")
    p.add_argument("--arch", choices=sorted(PLATFORMS), default="amd64")
    p.add_argument("--base", default="debootstrap",
                   help="'debootstrap' (a Debian rootfs made here) or an image with Python 3.11, e.g. python:3.11-slim")
    p.add_argument("--tag", help="image name (default localhost/edgeml-KIND:VERSION-ARCH)")
    p.add_argument("--cache", default="~/.cache/edgeml", help="cache folder (rootfs, site, build temp)")
    p.add_argument("--rootfs-cache", help="where the Debian rootfs lives (default CACHE/rootfs)")
    p.add_argument("--source", default=str(REPO), help="the edgeml source tree to package (default this checkout)")
    p.add_argument("--torch-index", default=TORCH_CPU_INDEX,
                   help="compiler image: PyTorch's CPU wheel index, used when reachable ('' to never use it)")
    p.add_argument("--oci-archive", help="also write the image as an OCI archive to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.cache).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        result = build(args)
    except Missing as exc:
        log(f"error: {exc}")
        return EXIT_MISSING
    except StepFailed as exc:
        log(f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        goal = f" (goal <= {result.goal_mb} MB: {'met' if result.within_goal else 'NOT met'})" if result.goal_mb else ""
        print(f"{result.image}: {result.size_mb} MB{goal}, built in {result.seconds}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
