"""Target registry: one declarative TOML file per target in this folder.

A target says what an artifact is built for: the CPU architecture and
features it needs, the backends and precisions that can serve it, the TVM
target dict and the cross compiler. ``host_features()`` reads this machine's
CPU flags so ``edgeml targets --host`` can tell which targets run here.

``EDGEML_HOST_FEATURES`` masks features, for tests and for proving the paths a
smaller CPU takes on a bigger one: ``-avx512*,-amx*`` removes every flag matching
a pattern; a list without ``-`` keeps only the flags it names. It can only take
features away, never claim one the CPU lacks (that would execute illegal
instructions). ``masked_features()`` says what was hidden; ``isolation_env()``
gives a worker process the same mask plus the matching oneDNN ISA cap.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import re
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


HOST_FEATURES_ENV = "EDGEML_HOST_FEATURES"


@lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """CPU flags of this machine, less those masked by ``EDGEML_HOST_FEATURES``."""
    real = real_host_features()
    return frozenset(real - _masked(real, os.environ.get(HOST_FEATURES_ENV, "")))


def masked_features() -> list[str]:
    """The real features ``EDGEML_HOST_FEATURES`` hides (empty when nothing is masked)."""
    return sorted(real_host_features() - host_features())


def parse_feature_mask(text: str) -> tuple[list[str], list[str]]:
    """(patterns to remove, flags to keep) from ``-avx512*,-amx*`` or ``sse4_2,avx2,fma``."""
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    remove = [t[1:] for t in tokens if t.startswith("-") and len(t) > 1]
    keep = [t for t in tokens if not t.startswith("-")]
    return remove, keep


def _masked(real: frozenset[str], text: str) -> set[str]:
    remove, keep = parse_feature_mask(text)
    hidden = {f for f in real if any(fnmatch.fnmatchcase(f, pattern) for pattern in remove)}
    if keep:
        hidden |= {f for f in real if f not in keep and f not in ("x86_64", "cuda", "intel_gpu")}
    return hidden


def isolation_env() -> dict[str, str]:
    """Environment for a process that must see the same (masked) CPU: the mask and oneDNN's ISA cap."""
    env = {}
    mask = os.environ.get(HOST_FEATURES_ENV)
    if mask:
        env[HOST_FEATURES_ENV] = mask
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or onednn_isa_cap(host_features())   # an explicit cap wins
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


def onednn_isa_cap(features: frozenset[str]) -> str | None:
    """The highest oneDNN ISA these x86 features allow (its ``ONEDNN_MAX_CPU_ISA`` names)."""
    if host_arch() != "x86_64":
        return None
    if {"amx_tile", "amx_int8", "amx_bf16"} <= features:
        return "AVX512_CORE_AMX"
    if {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"} <= features:
        return "AVX512_CORE_BF16"
    if {"avx512f", "avx512bw", "avx512_vnni"} <= features:
        return "AVX512_CORE_VNNI"
    if {"avx512f", "avx512bw"} <= features:
        return "AVX512_CORE"
    if {"avx2", "avx_vnni"} <= features:
        return "AVX2_VNNI"
    if "avx2" in features:
        return "AVX2"
    if "avx" in features:
        return "AVX"
    return "SSE41"


def host_isa() -> str:
    """A short name for the widest vector ISA this host (as masked) executes: what its kernels used."""
    return (onednn_isa_cap(host_features()) or host_arch()).lower()


@lru_cache(maxsize=1)
def real_host_features() -> frozenset[str]:
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
