"""Structured (channel) pruning as a source of compile candidates (PyTorch models only).

``edgeml compile pkg.module:factory --prune 0.25,0.5 --train TRAIN.npz`` (or ``prune=(0.25, 0.5)``,
``train=...`` in Python) makes, for each ratio, a copy of the PyTorch module with that fraction of the
channels of every prunable group removed by torch-pruning (``MagnitudePruner``, group L2 importance over
its dependency graph; the last ``nn.Linear`` keeps its outputs, so the classes do not change), fine-tunes it
for ``fine_tune_epochs`` on the training split, and exports it to ONNX exactly like the dense model. Each
pruned model is then offered to every backend like the dense one, and its candidates go through the same
evaluation, benchmark and selection: a pruned candidate ships only when it is the fastest within the
accuracy tolerance. The chosen candidate's recipe is recorded in ``manifest["pruning"]``.

The loss: a training file with ``labels`` (integer class indices) trains a classifier with cross-entropy.
Any other objective is given through the Python API as ``train_loss=fn`` with
``fn(outputs: Tensor, targets: Tensor) -> Tensor`` (a scalar); the targets are the file's ``targets``
array (or its ``labels``), first axis = samples.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.compiler import evaluate as ev
from edgeml.compiler_data import load_npz
from edgeml.compiler.importers import ImportedModel, import_model, is_factory_spec
from edgeml.compiler.importers import _call_factory as call_factory
from edgeml.errors import DataError, MissingDependency, UsageError

MAX_RATIO = 0.9
MAX_EPOCHS = 1000
BATCH = 64
LEARNING_RATE = 1e-3
SEED = 0


@dataclass(frozen=True)
class PruneRecipe:
    """What was done to make one pruned model (-> the candidate's and the manifest's ``pruning``)."""

    ratio: float
    method: str
    importance: str
    kept_layers: str
    fine_tune_epochs: int
    loss: str
    train_samples: int
    train_sha256: str
    params_before: int
    params_after: int
    fine_tune_seconds: float

    def to_dict(self, reproducible: bool) -> dict[str, Any]:
        d = asdict(self)
        if reproducible:  # a wall time would change the bytes of a reproducible build
            d["fine_tune_seconds"] = None
        return d


@dataclass
class PrunedModel:
    ratio: float
    imported: ImportedModel
    recipe: PruneRecipe

    @property
    def tag(self) -> str:
        return f"pruned{round(self.ratio * 100)}"


def parse_ratios(value: Any) -> tuple[float, ...]:
    """``"0.25,0.5"`` or ``[0.25, 0.5]`` -> (0.25, 0.5), each in (0, MAX_RATIO]."""
    if value is None or value == "" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    ratios: list[float] = []
    for item in items:
        try:
            ratio = float(str(item).strip())
        except ValueError:
            raise UsageError(f"--prune {value!r}: {item!r} is not a number",
                             hint="give channel ratios to remove, e.g. --prune 0.25,0.5") from None
        if not 0.0 < ratio <= MAX_RATIO:
            raise UsageError(f"--prune ratio {ratio:g} must be above 0 and at most {MAX_RATIO:g}",
                             hint="e.g. --prune 0.25,0.5 (the fraction of channels removed)")
        if ratio not in ratios:
            ratios.append(ratio)
    if len(ratios) > 4:
        raise UsageError(f"--prune lists {len(ratios)} ratios; at most 4 (each one is a fine-tune and candidates)")
    return tuple(ratios)


def check_options(model: Any, ratios: tuple[float, ...], train: Path | None, epochs: int,
                  loss: Callable[..., Any] | None) -> None:
    """Refuse a pruning request that cannot work, before any import or training."""
    if not ratios:
        if train is not None or loss is not None:
            raise UsageError("--train / train_loss are only used with --prune", hint="add e.g. --prune 0.25,0.5")
        return
    if not (_is_module(model) or (isinstance(model, str) and is_factory_spec(model))):
        raise UsageError(f"--prune needs a PyTorch model ('pkg.module:factory' or an nn.Module); got {model}",
                         hint="pruning changes the PyTorch module's channels; an ONNX file has no training graph")
    if train is None:
        raise UsageError("--prune needs training data to fine-tune the pruned model",
                         hint="pass --train TRAIN.npz (the inputs by name, plus 'labels' for a classifier)")
    if not Path(train).is_file():
        raise DataError(f"training file {train} does not exist")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 0 <= epochs <= MAX_EPOCHS:
        raise UsageError(f"fine_tune_epochs must be an integer from 0 to {MAX_EPOCHS}, got {epochs!r}")
    if loss is not None and not callable(loss):
        raise UsageError(f"train_loss must be a callable loss(outputs, targets) -> Tensor, got {type(loss).__name__}")


def pruned_models(model: Any, opts: Any, inputs: list[Any], outputs: list[Any], workdir: Path,
                  reproducible: bool, say: Callable[[str], None]) -> list[PrunedModel]:
    """One pruned, fine-tuned, exported model per ratio in ``opts.prune``."""
    if not opts.prune:
        return []
    tp = _torch_pruning()
    import torch

    inputs_t, targets_t, loss_fn, loss_name, n = _training_data(opts, inputs, outputs)
    dense = model if _is_module(model) else call_factory(str(model))
    example = tuple(torch.zeros(*shape) for shape in opts.input_shape.values())
    before = _params(dense)
    made: list[PrunedModel] = []
    for ratio in opts.prune:
        say(f"pruning {ratio:.0%} of the channels, fine-tuning {opts.fine_tune_epochs} epoch(s) on {n} samples")
        net = copy.deepcopy(dense).eval()
        _prune(tp, net, example, ratio)
        start = time.perf_counter()
        _fine_tune(net, inputs_t, targets_t, loss_fn, opts.fine_tune_epochs)
        seconds = time.perf_counter() - start
        imported = import_model(net.eval(), opts.input_shape, workdir / f"pruned-{round(ratio * 100)}")
        _same_interface(imported, inputs, outputs, ratio)
        recipe = PruneRecipe(ratio=ratio, method="torch-pruning MagnitudePruner (structured channels)",
                             importance="group L2 magnitude", kept_layers="last nn.Linear",
                             fine_tune_epochs=opts.fine_tune_epochs, loss=loss_name, train_samples=n,
                             train_sha256=ev.file_sha256(opts.train), params_before=before,
                             params_after=_params(net), fine_tune_seconds=round(seconds, 3))
        made.append(PrunedModel(ratio, imported, recipe))
    return made


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as exc:
        raise MissingDependency(f"--prune needs the Python package 'torch-pruning', which is not installed ({exc})",
                                hint="pip install 'edgeml[compiler]' (or pip install torch-pruning)") from exc
    return torch_pruning


def _is_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _training_data(opts: Any, inputs: list[Any], outputs: list[Any]) -> tuple[Any, Any, Any, str, int]:
    """(input tensors in forward() order, targets, loss, loss name, samples) from the --train file."""
    import torch

    data = ev.load_dataset(opts.train, inputs, outputs, "training")
    raw = load_npz(opts.train, "training")
    if opts.train_loss is not None:
        if "targets" in raw:
            targets = np.asarray(raw["targets"])
        elif data.labels is not None:
            targets = data.labels
        else:
            raise DataError(f"training file {opts.train} has neither 'targets' nor 'labels' for train_loss",
                            hint="add the array your loss compares the outputs with, keyed 'targets'")
        if targets.shape[0] != data.n:
            raise DataError(f"training file {opts.train}: 'targets' has {targets.shape[0]} samples, "
                            f"the inputs {data.n}")
        loss_fn, loss_name = opts.train_loss, getattr(opts.train_loss, "__qualname__", "custom")
    elif data.labels is not None:
        targets, loss_fn, loss_name = data.labels, torch.nn.CrossEntropyLoss(), "cross-entropy on labels"
    else:
        raise DataError(f"training file {opts.train} has no 'labels' array, so the fine-tune has no loss",
                        hint="add 'labels' (class indices) for a classifier, or give train_loss=fn in Python")
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(data.inputs[t.name])) for t in inputs)
    return tensors, torch.from_numpy(np.ascontiguousarray(targets)), loss_fn, loss_name, data.n


def _prune(tp: Any, net: Any, example: tuple[Any, ...], ratio: float) -> None:
    import torch

    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(net, example if len(example) > 1 else example[0],
                                       importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=head)
    pruner.step()


def _fine_tune(net: Any, inputs: tuple[Any, ...], targets: Any, loss_fn: Any, epochs: int) -> None:
    """Adam with a cosine schedule, a fixed seed: the same data and epochs give the same weights."""
    import torch

    if epochs == 0:
        return
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(targets)
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, BATCH):
                idx = order[i: i + BATCH]
                opt.zero_grad()
                out = net(*(x[idx] for x in inputs))
                loss = loss_fn(out[0] if isinstance(out, (tuple, list)) else out, targets[idx])
                loss.backward()
                opt.step()
            sched.step()
    net.eval()


def _params(net: Any) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def _same_interface(imported: ImportedModel, inputs: list[Any], outputs: list[Any], ratio: float) -> None:
    if [t.to_dict() for t in imported.inputs] != [t.to_dict() for t in inputs] or \
            [t.to_dict() for t in imported.outputs] != [t.to_dict() for t in outputs]:
        raise UsageError(f"pruning {ratio:g} changed the model's inputs or outputs",
                         hint="keep the output layer out of pruning (edgeml keeps the last nn.Linear)")


def digest(ratios: tuple[float, ...], epochs: int, loss: Callable[..., Any] | None) -> str:
    """A short identity of the pruning request for the compile cache key."""
    text = f"{ratios}|{epochs}|{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', '')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
