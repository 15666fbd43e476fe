import pytest

from edgeml.errors import RegistryError
from edgeml.registry import Registry


def test_duplicate_names_raise_at_construction():
    with pytest.raises(RegistryError, match="duplicate widget 'a'"):
        Registry("widget", [("a", "json:dumps"), ("a", "json:loads")])


def test_entries_resolve_lazily_to_their_attribute():
    reg = Registry("widget", [("dumps", "json:dumps")])
    import json

    assert reg.get("dumps") is json.dumps
    assert "dumps" in reg and reg.names() == ["dumps"]


def test_unknown_name_lists_the_choices():
    reg = Registry("widget", [("a", "json:dumps"), ("b", "json:loads")])
    with pytest.raises(RegistryError) as info:
        reg.get("c")
    assert "unknown widget 'c'" in str(info.value) and "a, b" in str(info.value)
