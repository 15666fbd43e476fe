"""Reference models for benchmarks and tests, defined in the repo (no downloads).

* ``digits``: the shipped example CNN (``examples/digits/digits.onnx``, trained by
  ``examples/digits/train.py``); real calibration/eval data.
* ``mlp``: a tabular MLP (30 -> 64 -> 32 -> 2) trained here in about a second on
  scikit-learn's breast_cancer set; its input is the standardized 30 features
  (train-split mean/std, applied by :func:`data`); real calibration/eval data.
* ``mobilenetv2``: MobileNetV2 (width 1.0, 224x224, 1000 classes) and
* ``resnet18``: ResNet-18 (224x224, 1000 classes), both written out below as in
  their papers (torchvision's layout), with random weights from a fixed seed
  (Kaiming init, as torchvision initializes). Good for speed, meaningless for
  accuracy: their calibration/eval data are seeded standard-normal images, and
  without labels the compiler measures agreement with FP32.

* ``bert-mini``: a BERT-class sentence encoder (MiniLM-L6's shape, random weights) built from a
  ``transformers`` config in ``benchmarks/encoder.py``: int64 ``input_ids`` / ``attention_mask`` with a
  dynamic sequence axis, output ``sentence_embedding``; seeded token data (the metric is cosine).

API: ``build(name) -> torch.nn.Module``, ``export_onnx(name, path, batch=1 | "dynamic")``,
``data(name, n_calib, n_eval) -> (calib, eval)`` dicts keyed by input name (eval adds
``labels`` where real labels exist), ``write_data(name, folder)``.
CLI: ``python -m edgeml.benchmarks.models NAME OUT.onnx [--batch 1|dynamic] [--data FOLDER]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import UsageError

TRANSFORMERS = ("bert-mini",)
NAMES = ("digits", "mlp", "mobilenetv2", "resnet18", *TRANSFORMERS)
SEED = 1234
OPSET = 17
REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "examples" / "digits"
INPUT_SHAPES = {"digits": (1, 8, 8), "mlp": (30,), "mobilenetv2": (3, 224, 224), "resnet18": (3, 224, 224)}


def _check(name: str) -> None:
    if name not in NAMES:
        raise UsageError(f"unknown reference model {name!r}", hint=f"choose one of {', '.join(NAMES)}")


# ------------------------------------------------------------------ architectures


def resnet18(num_classes: int = 1000):
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + idt)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    return _init(ResNet18())


def mobilenetv2(num_classes: int = 1000):
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else [cbr(cin, hidden, 1)]
            layers += [cbr(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s) from the paper
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self):
            super().__init__()
            layers, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(cbr(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    return _init(MobileNetV2())


def _init(model):
    """torchvision's initialization, from the fixed seed; eval mode."""
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)
                m.bias.zero_()
    return model.eval()


def _breast_cancer() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Standardized breast_cancer splits: train 369 / calib 100 / eval 100 (stratified, seeded)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float64)
    y = y.astype(np.int64)
    x_rest, x_eval, y_rest, y_eval = train_test_split(x, y, test_size=100, stratify=y, random_state=SEED)
    x_train, x_calib, y_train, y_calib = train_test_split(x_rest, y_rest, test_size=100, stratify=y_rest,
                                                          random_state=SEED)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    f = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return {"train": (f(x_train), y_train), "calib": (f(x_calib), y_calib), "eval": (f(x_eval), y_eval)}


def _mlp_module():
    from torch import nn
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))


@lru_cache(maxsize=1)
def _mlp_state() -> dict:
    """Train the tabular MLP once per process (full-batch Adam, 300 steps, one thread: deterministic, ~1 s)."""
    import torch
    from torch import nn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = _mlp_module()
        x, y = _breast_cancer()["train"]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        with torch.enable_grad():  # callers may hold torch.no_grad()
            for _ in range(300):
                opt.zero_grad()
                loss_fn(model(xt), yt).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mlp():
    """The trained tabular MLP (a fresh module each call)."""
    model = _mlp_module()
    model.load_state_dict(_mlp_state())
    return model.eval()


def build(name: str):
    """The torch module of a reference model (digits: the trained example re-read from ONNX is not a
    torch module, so ``build('digits')`` retrains it with examples/digits/train.py's recipe)."""
    _check(name)
    if name in TRANSFORMERS:
        from edgeml.benchmarks import encoder

        return encoder.build(name)
    if name == "resnet18":
        return resnet18()
    if name == "mobilenetv2":
        return mobilenetv2()
    if name == "mlp":
        return mlp()
    return _digits_torch()


def _digits_torch():
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgeml_digits_train", DIGITS_DIR / "train.py")
    if spec is None or spec.loader is None:
        raise UsageError(f"{DIGITS_DIR / 'train.py'} is missing")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.set_determinism()
    splits = train.load_splits()
    model = train.build_model()
    import torch

    with torch.enable_grad():
        train.train(model, *splits["train"])
    return model


# ------------------------------------------------------------------ export + data


def input_name(name: str) -> str:
    return "input"


def export_onnx(name: str, path: str | Path, batch: int | str = 1) -> Path:
    """Write the model as ONNX (opset 17): input ``input``, output ``logits``.

    ``batch`` is a fixed batch size or ``"dynamic"``. ``digits`` is the shipped file
    (copied, with its batch dimension fixed when ``batch`` is a number).
    """
    _check(name)
    path = Path(path)
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise UsageError(f"batch must be a positive integer or 'dynamic', got {batch!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if name in TRANSFORMERS:  # batch and sequence stay dynamic: served at many lengths
        from edgeml.benchmarks import encoder

        return encoder.export_onnx(name, path)
    if name == "digits" and (DIGITS_DIR / "digits.onnx").is_file():
        if batch == "dynamic":
            shutil.copyfile(DIGITS_DIR / "digits.onnx", path)
        else:
            _fix_batch(DIGITS_DIR / "digits.onnx", path, int(batch))
        return path
    import torch

    model = build(name)
    dummy = torch.zeros((1 if batch == "dynamic" else int(batch), *INPUT_SHAPES[name]))
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if batch == "dynamic" else None
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"], dynamic_axes=dynamic,
                          do_constant_folding=True)
    tmp.replace(path)
    return path


def _fix_batch(src: Path, dst: Path, batch: int) -> None:
    import onnx

    model = onnx.load(str(src))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)


def data(name: str, n_calib: int = 64, n_eval: int = 64) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, eval) arrays keyed by input name; eval has ``labels`` for digits and mlp.

    For the random-weight CNNs these are seeded standard-normal images (like
    normalized ImageNet pixels in range, not in content): fine for calibration
    ranges and speed, not for accuracy claims.
    """
    _check(name)
    if name in TRANSFORMERS:
        from edgeml.benchmarks import encoder

        return encoder.data(name, n_calib, n_eval)
    if name == "digits":
        calib_file = dict(np.load(DIGITS_DIR / "calib.npz"))
        eval_file = dict(np.load(DIGITS_DIR / "eval.npz"))
        return ({"input": calib_file["input"][:n_calib]},
                {"input": eval_file["input"][:n_eval], "labels": eval_file["labels"][:n_eval]})
    if name == "mlp":
        s = _breast_cancer()
        return ({"input": s["calib"][0][:n_calib]}, {"input": s["eval"][0][:n_eval], "labels": s["eval"][1][:n_eval]})
    rng = np.random.default_rng(SEED)
    shape = INPUT_SHAPES[name]
    calib = rng.standard_normal((n_calib, *shape)).astype(np.float32)
    ev = rng.standard_normal((n_eval, *shape)).astype(np.float32)
    return {"input": calib}, {"input": ev}


def write_data(name: str, folder: str | Path, n_calib: int = 64, n_eval: int = 64) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calib, ev = data(name, n_calib, n_eval)
    paths = {"calib": folder / f"{name}_calib.npz", "eval": folder / f"{name}_eval.npz"}
    np.savez(paths["calib"], **dict[str, Any](calib))
    np.savez(paths["eval"], **dict[str, Any](ev))
    return paths


def describe(name: str) -> dict[str, Any]:
    _check(name)
    if name in TRANSFORMERS:
        from edgeml.benchmarks import encoder

        return {"name": name, "input": list(encoder.INPUTS), "input_shape": ["N", "sequence"],
                "output": encoder.OUTPUT, "weights": f"random (seed {encoder.SEED})", "data": "seeded token ids",
                "config": {k: encoder.CONFIGS[name][k] for k in ("hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "vocab_size")}}
    return {"name": name, "input": "input", "input_shape": ["N", *INPUT_SHAPES[name]], "output": "logits",
            "weights": "trained" if name in ("digits", "mlp") else f"random (seed {SEED})",
            "data": "real" if name in ("digits", "mlp") else "seeded standard-normal"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.models",
                                description="Export a reference model to ONNX.")
    p.add_argument("name", choices=NAMES)
    p.add_argument("out", type=Path, help="output .onnx file")
    p.add_argument("--batch", default="1", help="fixed batch size or 'dynamic' (default 1)")
    p.add_argument("--data", type=Path, help="also write NAME_calib.npz / NAME_eval.npz into this folder")
    a = p.parse_args(argv)
    batch: int | str = "dynamic" if a.batch == "dynamic" else int(a.batch)
    try:
        export_onnx(a.name, a.out, batch)
        if a.data:
            write_data(a.name, a.data)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
