"""edgeml: compile models into verified artifacts, serve them, roll them out to fleets.

    import edgeml
    path = edgeml.compile("model.onnx", target="x86_64-avx2", output="model.edgepkg")
    model = edgeml.load(path)
    outputs = model.predict({"input": x})
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, **options):
    """Load and verify an artifact; see edgeml.runtime.model.load."""
    from edgeml.runtime.model import load as _load

    return _load(path, **options)


def compile(model, *, target: str, output, **options):  # noqa: A001 - the product's verb
    """Compile a model into an artifact; see edgeml.compiler.compile."""
    from edgeml.compiler import compile as _compile

    return _compile(model, target=target, output=output, **options)


__all__ = ["__version__", "compile", "load"]
