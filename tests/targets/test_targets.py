"""The target registry: shipped files, validation, host detection from CPU flags."""

from __future__ import annotations

import pytest

from edgeml.errors import TargetError
from edgeml.targets import _cpuinfo_flags, all_targets, get_target, parse_target_file

SHIPPED = {"x86_64", "x86_64-avx2", "x86_64-avx512-vnni", "aarch64-a72", "aarch64-a76", "jetson-orin",
           "nvidia-gpu", "intel-gpu"}

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2

processor\t: 1
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2
"""
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""


def test_every_shipped_target_parses_with_unique_names():
    targets = all_targets()
    assert SHIPPED <= set(targets)
    for name, t in targets.items():
        assert t.name == name and t.backends and t.precisions and t.arch in ("x86_64", "aarch64")
        assert "fp32" in t.precisions or t.device != "cpu"


def test_unknown_target_lists_the_choices():
    with pytest.raises(TargetError, match="unknown target 'pdp-11'") as info:
        get_target("pdp-11")
    assert "x86_64-avx2" in str(info.value)


def test_name_must_match_file_so_duplicates_cannot_exist(tmp_path):
    (tmp_path / "a.toml").write_text(
        'name = "x86_64"\ndescription = "dup"\narch = "x86_64"\nrequired_features = []\n'
        'backends = ["onnxruntime"]\nprecisions = ["fp32"]\ndevice = "cpu"\n')
    with pytest.raises(TargetError, match="must match the file name"):
        parse_target_file(tmp_path / "a.toml")


def test_duplicate_target_names_raise(tmp_path, monkeypatch):
    import edgeml.targets as tg

    body = ('name = "same"\ndescription = "d"\narch = "x86_64"\nrequired_features = []\n'
            'backends = ["onnxruntime"]\nprecisions = ["fp32"]\ndevice = "cpu"\n')
    for stem in ("t1", "t2"):
        (tmp_path / f"{stem}.toml").write_text(body)
    real = tg.parse_target_file
    renamed = tmp_path / "renamed"
    renamed.mkdir()

    def lenient(path):  # skip the name == file-name rule (tested above) to reach the duplicate check
        copy = renamed / "same.toml"
        copy.write_text(path.read_text())
        return real(copy)

    monkeypatch.setattr(tg, "parse_target_file", lenient)
    with pytest.raises(TargetError, match="duplicate target 'same'"):
        tg.all_targets.__wrapped__(tmp_path)
    (tmp_path / "t2.toml").unlink()
    (tmp_path / "broken.toml").write_text('name = "broken"\n')
    monkeypatch.setattr(tg, "parse_target_file", real)
    with pytest.raises(TargetError, match="lacks the keys"):
        tg.all_targets.__wrapped__(tmp_path)


def test_bad_arch_and_bad_toml_are_target_errors(tmp_path):
    (tmp_path / "z.toml").write_text(
        'name = "z"\ndescription = "d"\narch = "riscv64"\nrequired_features = []\n'
        'backends = ["onnxruntime"]\nprecisions = ["fp32"]\ndevice = "cpu"\n')
    with pytest.raises(TargetError, match="riscv64"):
        parse_target_file(tmp_path / "z.toml")
    (tmp_path / "y.toml").write_text("name = [unterminated")
    with pytest.raises(TargetError, match="cannot be read"):
        parse_target_file(tmp_path / "y.toml")


def test_host_detection_from_sample_cpuinfo():
    x86 = frozenset(_cpuinfo_flags(X86_CPUINFO) | {"x86_64"})
    assert {"avx2", "fma", "sse4_2"} <= x86 and "avx512_vnni" not in x86
    assert get_target("x86_64").missing_features(x86) == []
    assert get_target("x86_64-avx2").missing_features(x86) == []
    assert "avx512_vnni" in get_target("x86_64-avx512-vnni").missing_features(x86)
    arm = frozenset(_cpuinfo_flags(PI4_CPUINFO))
    assert {"asimd", "crc32"} <= arm
    assert "avx2" in get_target("x86_64-avx2").missing_features(arm)
