"""Budgets and oracles shared by the fuzz properties.

Budgets (hypothesis settings, applied per test with ``@FUZZ`` so no other test's settings change):
  default                    150 examples per property, no per-example deadline: seconds in CI
  ``EDGEML_FUZZ=long``       20,000 examples per property (minutes)
  ``EDGEML_FUZZ_EXAMPLES=N`` any count
Coverage-guided runs of the same properties: ``tests/fuzz/run_atheris.py`` (see its docstring).

Each property states what may escape a parser: an EdgemlError subclass (artifact reader), the server's
BadRequest (v2 decoders), MessageRejected (fleet protocol). Anything else is a crash; each one found
becomes a named regression test beside the property.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def _examples() -> int:
    if "EDGEML_FUZZ_EXAMPLES" in os.environ:
        return int(os.environ["EDGEML_FUZZ_EXAMPLES"])
    return 20_000 if os.environ.get("EDGEML_FUZZ") == "long" else 150


FUZZ = settings(max_examples=_examples(), deadline=None, print_blob=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

# JSON values a hostile peer can send: odd numbers (huge, negative, float), strings that look like
# numbers, nulls, booleans, and nesting.
ODD_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["nan", "-inf", "1_2", "", "0x10", "1e999"]),
    st.text(max_size=12),
)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    ODD_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def deep_json(depth: int, opener: str = "[") -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "[":
        return (b"[" * depth) + (b"]" * depth)
    return (b'{"a":' * depth) + b"1" + (closer.encode() * depth)
