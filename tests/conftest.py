"""Fixtures and markers every test folder shares: tests never assume the CPU they run on.

- ``host_target``: the most specific CPU target this host executes (what ``edgeml targets --host`` marks
  with ``*``); compile for it instead of naming an AVX-512 or AMX target.
- ``@pytest.mark.needs_cpu("avx512f", ...)``: the test needs these CPU features (or ``arch:aarch64``,
  ``target:NAME`` for everything a shipped target requires, or ``tool:NAME`` for a program on PATH); it is
  skipped naming what is missing.
- ``mask_host_features("-avx512*,-amx*")``: hide features for one test (``EDGEML_HOST_FEATURES``), so the
  paths a smaller CPU takes are exercised on any machine; undone after the test.

The whole suite also runs masked: ``EDGEML_HOST_FEATURES=-avx512*,-amx*,-avx_vnni`` (a stage of .ci/run).
"""

from __future__ import annotations

import shutil
from typing import Callable, Iterator

import pytest


def _clear_host_caches() -> None:
    from edgeml.targets import host_features

    host_features.cache_clear()


def missing_requirements(required: tuple[str, ...]) -> list[str]:
    """The requirements of a ``needs_cpu`` marker this host (as masked) does not meet."""
    from edgeml.targets import host_arch, host_features

    have = host_features()
    missing = []
    for need in required:
        if need.startswith("arch:"):
            if host_arch() != need[5:]:
                missing.append(f"{need} (this host is {host_arch()})")
        elif need.startswith("target:"):
            from edgeml.targets import get_target

            missing += [f"{m} (target {need[7:]})" for m in get_target(need[7:]).missing_features()]
        elif need.startswith("tool:"):
            if shutil.which(need[5:]) is None:
                missing.append(f"{need[5:]} on PATH")
        elif need not in have:
            missing.append(need)
    return missing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_cpu(*features): needs these CPU features / arch:X / tool:X; "
                                       "skipped naming what this host lacks")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in item.iter_markers("needs_cpu"):
            missing = missing_requirements(tuple(marker.args))
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}, which this host lacks "
                                                        "(or EDGEML_HOST_FEATURES masks)"))


@pytest.fixture(scope="session")
def host_target():
    """The best CPU target this host runs (honours EDGEML_HOST_FEATURES)."""
    from edgeml.targets import best_host_target

    return best_host_target()


@pytest.fixture
def mask_host_features(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Call with a mask such as ``"-avx512*,-amx*"``; host detection sees the smaller CPU until the test ends."""
    from edgeml.targets import HOST_FEATURES_ENV

    def mask(value: str) -> None:
        monkeypatch.setenv(HOST_FEATURES_ENV, value)
        _clear_host_caches()

    yield mask
    monkeypatch.undo()
    _clear_host_caches()
