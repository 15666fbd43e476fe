"""Target registry: one declarative TOML file per target in this folder.

A target says what an artifact is built for: the CPU architecture and
features it needs, the backends and precisions that can serve it, the TVM
target dict and the cross compiler. ``host_features()`` reads this machine's
CPU flags so ``edgeml targets --host`` can tell which targets run here.
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgeml.errors import TargetError, UnsupportedHost

TARGET_DIR = Path(__file__).parent
_REQUIRED_KEYS = ("name", "description", "arch", "required_features", "backends", "precisions", "device")
_ARCHES = ("x86_64", "aarch64")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# A CPU target may list a reduced-precision float only when it requires the hardware for it, so the
# capability is detected (the host's /proc/cpuinfo flags, checked before an artifact runs), never assumed.
# (GPU targets run fp16 natively.)
CPU_FLOAT_FEATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "bf16": {"x86_64": ("avx512_bf16", "amx_bf16")},
    "fp16": {"aarch64": ("asimdhp",)},
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    required_features: tuple[str, ...]
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    device: str = "cpu"
    default_threads: int = 0
    cross_compiler: str | None = None
    qemu_cpu: str | None = None
    int8_saturation_hazard: bool = False
    tvm: dict[str, Any] = field(default_factory=dict)

    def missing_features(self, features: frozenset[str] | None = None) -> list[str]:
        have = host_features() if features is None else features
        missing = [f for f in self.required_features if f not in have]
        if self.arch != host_arch() and features is None:
            missing.insert(0, f"arch:{self.arch}")
        return missing

    def runs_on_host(self) -> bool:
        return not self.missing_features()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "required_features": list(self.required_features),
            "backends": list(self.backends),
            "precisions": list(self.precisions),
            "device": self.device,
            "default_threads": self.default_threads,
            "cross_compiler": self.cross_compiler,
            "int8_saturation_hazard": self.int8_saturation_hazard,
            "tvm": self.tvm,
        }


def parse_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetError(f"target file {path} cannot be read: {exc}") from exc
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise TargetError(f"target file {path} lacks the keys {missing}", hint="see targets/x86_64.toml for the format")
    if data["name"] != path.stem:
        raise TargetError(f"target file {path} names itself '{data['name']}'; the name must match the file name")
    if data["arch"] not in _ARCHES:
        raise TargetError(f"target file {path}: arch '{data['arch']}' is not one of {_ARCHES}")
    _check_precisions(path, data)
    return Target(
        name=data["name"],
        description=data["description"],
        arch=data["arch"],
        required_features=tuple(data["required_features"]),
        backends=tuple(data["backends"]),
        precisions=tuple(data["precisions"]),
        device=data["device"],
        default_threads=int(data.get("default_threads", 0)),
        cross_compiler=data.get("cross_compiler"),
        qemu_cpu=data.get("qemu_cpu"),
        int8_saturation_hazard=bool(data.get("int8_saturation_hazard", False)),
        tvm=dict(data.get("tvm", {})),
    )


def _check_precisions(path: Path, data: dict[str, Any]) -> None:
    unknown = [p for p in data["precisions"] if p not in PRECISIONS]
    if unknown:
        raise TargetError(f"target file {path}: precisions {unknown} are not among {list(PRECISIONS)}")
    if data["device"] != "cpu":
        return
    for precision, by_arch in CPU_FLOAT_FEATURES.items():
        if precision not in data["precisions"]:
            continue
        needs = by_arch.get(data["arch"], ())
        if not set(needs) & set(data["required_features"]):
            what = f"one of {list(needs)} in required_features" if needs else f"a {data['arch']} CPU cannot"
            raise TargetError(f"target file {path} lists precision {precision} for a {data['arch']} CPU without "
                              f"requiring the hardware for it ({what})",
                              hint="require the CPU feature, so hosts without it refuse the artifact")


@lru_cache(maxsize=None)
def all_targets(directory: Path = TARGET_DIR) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for path in sorted(directory.glob("*.toml")):
        target = parse_target_file(path)
        if target.name in targets:
            raise TargetError(f"duplicate target '{target.name}' in {directory}")
        targets[target.name] = target
    return targets


def get_target(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise TargetError(f"unknown target '{name}'", hint=f"choose one of: {', '.join(targets)} (edgeml targets)")
    return targets[name]


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _cpuinfo_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """CPU flags of this machine (``/proc/cpuinfo``), plus accelerators we can see."""
    try:
        flags = _cpuinfo_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = set()
    if host_arch() == "x86_64":
        flags.add("x86_64")
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists():
        flags.add("cuda")
    if Path("/dev/dri").exists() and any(Path("/sys/class/drm").glob("card*/device/vendor")):
        for vendor in Path("/sys/class/drm").glob("card*/device/vendor"):
            if vendor.read_text().strip() == "0x8086":
                flags.add("intel_gpu")
    return frozenset(flags)


def host_targets() -> list[Target]:
    return [t for t in all_targets().values() if t.runs_on_host()]


def best_host_target() -> Target:
    """The most specific CPU target this host executes (most required features)."""
    cpu = [t for t in host_targets() if t.device == "cpu"]
    if not cpu:
        raise UnsupportedHost(f"no shipped target runs on this {host_arch()} host")
    return max(cpu, key=lambda t: len(t.required_features))


def check_host_supports(name: str, required_features: list[str], arch: str) -> None:
    """Raise UnsupportedHost when this machine cannot execute an artifact."""
    if arch != host_arch():
        raise UnsupportedHost(
            f"artifact for target '{name}' needs a {arch} CPU; this host is {host_arch()}",
            hint="compile for a target this host runs (edgeml targets --host)",
        )
    missing = [f for f in required_features if f not in host_features()]
    if missing:
        raise UnsupportedHost(
            f"artifact for target '{name}' needs CPU features {missing} that this host lacks",
            hint="compile for a target this host runs (edgeml targets --host)",
        )
