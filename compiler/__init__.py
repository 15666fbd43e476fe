"""edgeml.compiler: ONNX / PyTorch models -> verified, versioned ``.edgepkg`` artifacts.

    import edgeml
    path = edgeml.compile("model.onnx", target="x86_64-avx2", output="model.edgepkg",
                          calib="calib.npz", eval="eval.npz", max_accuracy_drop=1.0)

``compile_with_report`` returns a :class:`CompileResult` (the manifest, every
candidate's evidence, whether the cache was hit); ``compile`` returns the path.
Keyword names are the CLI's long options with underscores; any other keyword must
be a backend's typed option (e.g. ``ort_int8_recipes=[...]``, ``tune_budget="10m"``;
see ``edgeml.backends.<name>.Options``): a misspelled one is refused with the valid
names (UsageError) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def compile_with_report(model: Any, *, target: Any, output: Any, **options: Any):
    """Compile and return the CompileResult (see edgeml.compiler.pipeline)."""
    from edgeml.compiler.pipeline import compile_with_report as _run

    if options.get("progress") is True:
        import sys

        options["progress"] = lambda message: print(f"[edgeml] {message}", file=sys.stderr, flush=True)
    cache_dir = options.pop("cache_dir", None)
    use_cache = options.pop("use_cache", True)
    if cache_dir is False:
        use_cache = False
        cache_dir = None
    return _run(model, target=target, output=output, cache_dir=cache_dir, use_cache=use_cache, **options)


def compile(model: Any, *, target: Any, output: Any, precision: str = "auto", backend: str = "auto",  # noqa: A001
            calib: Any = None, eval: Any = None, max_accuracy_drop: float = 1.0, input_shape: Any = None,  # noqa: A002
            name: str | None = None, version: str = "0.1.0", sign_key: Any = None, cache_dir: Any = None,
            benchmark: bool = True, progress: Any = None, **backend_options: Any) -> Path:
    """Compile ``model`` (.onnx path, .pt2 path, ``pkg.module:factory`` or nn.Module) for ``target``.

    Returns the path of the written ``.edgepkg``. ``cache_dir=False`` disables the compile cache.
    """
    result = compile_with_report(
        model, target=target, output=output, precision=precision, backend=backend, calib=calib, eval=eval,
        max_accuracy_drop=max_accuracy_drop, input_shape=input_shape, name=name, version=version,
        sign_key=sign_key, cache_dir=cache_dir, benchmark=benchmark, progress=progress, **backend_options)
    return result.path


__all__ = ["compile", "compile_with_report"]
