"""MetaSchedule tuning for the TVM backend, within a wall-clock budget, with a reusable database.

``tune_and_apply(mod, params, target, budget_s=...)`` lowers a Relax module the
way ``relax.pipeline.static_shape_tuning_pipeline`` does (legalize, fuse, CPU
weight-layout rewrite), tunes the kernels that the database has no record for,
applies the best records, and returns the module ready for ``tvm.compile``.

What goes wrong with the stock pipeline here, and what this module does instead:

* every builder worker imports ``tvm.s_tir.tensor_intrin`` (20-60 s: ~500
  ``@T.prim_func`` decorators call ``inspect.stack()``, slow with torch loaded)
  and the builder's 30 s timeout kills it, so every build fails silently.
  Here the build function skips that import (``_build``), workers are kept
  between batches (``PersistentBuilder``), and torch is made unimportable in
  the workers (tvm_ffi imports it when present; it is never needed there).
* ``max_trials_per_task`` defaults to the whole budget, so a small budget is
  spent on task 0: the budget is split across the tasks, and a measure
  callback stops every task when the wall-clock deadline passes.
* build/run failures only show in the builder results: the callback counts
  them, reports the first one, and a tuning where nothing ran is an error.

Records live in a JSON database per target (``database_dir``), keyed by the
workload's structural hash, so later compiles of the same model (or of other
models sharing layers) reuse them without measuring again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeml.errors import CompileError

MIN_TRIALS_PER_TASK = 4
MAX_TRIALS_PER_TASK = 64
FIRST_GUESS_SECONDS_PER_TRIAL = 1.5
MAX_ROUNDS = 3
MIN_ROUND_S = 30


@dataclass
class TuningReport:
    tuned: bool
    budget_s: float
    seconds: float = 0.0
    tasks: int = 0
    tasks_from_database: int = 0
    tasks_tuned: int = 0
    tasks_measured: int = 0
    trials: int = 0
    trials_per_task: int = 0
    failed_builds: int = 0
    failed_runs: int = 0
    first_error: str | None = None
    database: str = ""
    weight_prepack: bool = True
    estimated_full_tuning_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 1)
        d["estimated_full_tuning_s"] = round(self.estimated_full_tuning_s)
        return d

    def summary(self) -> str:
        if self.tasks and self.tasks_from_database == self.tasks:
            return f"tuned TVM build: all {self.tasks} kernels from the tuning database {self.database} (no new trials)"
        return (f"tuned TVM build: {self.trials} trials over {self.tasks_tuned} of {self.tasks} kernels in "
                f"{self.seconds:.0f}s (budget {self.budget_s:.0f}s), {self.tasks_from_database} kernels from the "
                f"database; {self.failed_builds} failed builds, {self.failed_runs} failed runs")


def database_dir(target, root: str | Path | None = None) -> Path:
    """Folder of the tuning database for ``target``: ``ROOT/<kind>-<mcpu>-<hash>``."""
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "edgeml" / "tvm-tuning"
    text = json.dumps(_target_key(target), sort_keys=True)
    mcpu = str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""
    name = "-".join(p for p in (target.kind.name, mcpu) if p)
    return Path(root) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _target_key(target) -> Any:
    try:
        return json.loads(str(target))
    except (TypeError, ValueError):
        return str(target)


def with_host_cores(target):
    """MetaSchedule's CPU rules need ``num-cores``; add this host's when absent."""
    import tvm

    cfg = _target_key(target)
    if not isinstance(cfg, dict) or cfg.get("kind") != "llvm" or cfg.get("num-cores"):
        return target
    cores = os.cpu_count() or 1
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "keys", "host")}
    cfg["num-cores"] = cores
    return tvm.target.Target(cfg)


def _build(mod, target, _params):
    """Builder worker: MetaSchedule's default build without ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@contextmanager
def _torchless_workers() -> Iterator[None]:
    """Workers inherit PYTHONPATH: put a ``torch`` that fails to import in front of it."""
    stub = Path(tempfile.mkdtemp(prefix="edgeml-notorch-"))
    (stub / "torch").mkdir()
    (stub / "torch" / "__init__.py").write_text(
        'raise ImportError("edgeml: torch is not needed in TVM tuning workers")\n')
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(stub) + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        shutil.rmtree(stub, ignore_errors=True)


def _fast_stack(context: int = 1):
    """``inspect.stack`` that reads source lines for the 3 innermost frames only.

    TVMScript's ``@T.prim_func`` calls ``inspect.stack()`` and looks at frame 2's
    source line; reading every frame's source costs ~0.25 s per call with torch
    loaded (``inspect.getmodule`` scans sys.modules), so the ~500 prim_funcs of
    ``tvm.s_tir.tensor_intrin`` take minutes on a busy 2-core box.
    """
    import inspect
    import sys

    frame: Any = sys._getframe(1)
    infos: list[inspect.FrameInfo] = []
    while frame is not None:
        if len(infos) < 3 and not frame.f_code.co_filename.startswith("<"):
            info = inspect.getframeinfo(frame, context)
            infos.append(inspect.FrameInfo(frame, *info[:5], positions=getattr(info, "positions", None)))
        else:
            code = frame.f_code
            infos.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None,
                                           positions=None))
        frame = frame.f_back
    return infos


def import_tensor_intrin() -> float:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's CPU rules need it) with a cheap inspect.stack."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return 0.0
    start = time.perf_counter()
    original = inspect.stack
    inspect.stack = _fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
    return time.perf_counter() - start


def _classes():
    """Define the TVM-derived classes lazily (TVM is a heavy import)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        """LocalBuilder whose worker processes live across batches (recycled every few batches)."""

        def __init__(self, max_workers: int, timeout_sec: float, recycle_every: int = 25):
            super().__init__()
            self.max_workers = max_workers
            self.timeout_sec = timeout_sec
            self.recycle_every = recycle_every
            self._pool = None
            self._batches = 0

        def _get_pool(self):
            if self._pool is None or self._batches >= self.recycle_every:
                self.shutdown()
                self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec)
                self._batches = 0
            self._batches += 1
            return self._pool

        def shutdown(self) -> None:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

        def build(self, build_inputs):
            pool = self._get_pool()
            results = []
            jobs = [(_build, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for r in pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, "build failed: " + str(r.value)[:2000]))
            return results

    @derived_object
    class DeadlineProgress(PyMeasureCallback):
        """Counts trials and failures, reports progress, stops every task at the deadline."""

        def __init__(self, deadline: float, n_tasks: int, progress: Callable[[str], None],
                     clock: Callable[[], float] = time.monotonic):
            super().__init__()
            self.deadline = deadline
            self.n_tasks = n_tasks
            self.progress = progress
            self.clock = clock
            self.trials = 0
            self.failed_builds = 0
            self.failed_runs = 0
            self.first_error: str | None = None
            self.best: dict[int, float] = {}
            self.stopped = False
            self.started = clock()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if not builder_results:
                return
            for b, r in zip(builder_results, runner_results):
                self.trials += 1
                if b.error_msg:
                    self.failed_builds += 1
                    self.first_error = self.first_error or b.error_msg.strip().splitlines()[-1][:300]
                elif r.error_msg:
                    self.failed_runs += 1
                    self.first_error = self.first_error or r.error_msg.strip().splitlines()[-1][:300]
                elif r.run_secs:
                    secs = min(float(s) for s in r.run_secs)
                    self.best[task_id] = min(self.best.get(task_id, float("inf")), secs)
            now = self.clock()
            left = self.deadline - now
            self.progress(
                f"tvm tuning: {self.trials} trials, {len(self.best)}/{self.n_tasks} kernels measured, "
                f"{self.failed_builds + self.failed_runs} failed, {max(0.0, left):.0f}s left")
            if left <= 0 and not self.stopped:
                self.stopped = True
                self.progress("tvm tuning: budget spent, stopping")
                for i in range(self.n_tasks):
                    try:
                        task_scheduler.terminate_task(i)
                    except Exception:  # already finished
                        pass

    return PersistentBuilder, DeadlineProgress


def lower_for_tuning(mod, target, weight_prepack: bool):
    """The first half of ``static_shape_tuning_pipeline``: legalize, fuse, mark layout-free weights."""
    import tvm
    from tvm import relax

    passes = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if weight_prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def tune_and_apply(mod, params: list, target, *, budget_s: float, database_dir: Path,
                   progress: Callable[[str], None] = lambda m: None, trials_per_task: int | None = None,
                   weight_prepack: bool = True, seconds_per_trial: float = FIRST_GUESS_SECONDS_PER_TRIAL,
                   clock: Callable[[], float] = time.monotonic):
    """Tune ``mod`` (Relax, static shapes, params as inputs) within ``budget_s``; apply the records.

    Returns (module, params, TuningReport). The module still takes the original
    parameters; ``LiftTransformParams`` (run by the TVM backend) moves the
    weight-layout rewrites into ``main_transform_params``.
    """
    import importlib.util

    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    if importlib.util.find_spec("xgboost") is None:
        from edgeml.errors import MissingDependency

        raise MissingDependency("TVM tuning needs xgboost (MetaSchedule's cost model), which is not installed",
                                hint="pip install xgboost-cpu, or compile without --tune-budget")
    start = clock()
    target = with_host_cores(target)
    database_dir = Path(database_dir)
    database_dir.mkdir(parents=True, exist_ok=True)
    report = TuningReport(tuned=True, budget_s=budget_s, database=str(database_dir), weight_prepack=weight_prepack)
    mod = lower_for_tuning(mod, target, weight_prepack)
    database = ms.database.JSONDatabase(work_dir=str(database_dir), module_equality="structural")
    extracted = ms.relax_integration.extract_tasks(mod, target)
    report.tasks = len(extracted)
    todo = []
    for task in extracted:
        if database.has_workload(task.mod) and database.get_top_k(database.commit_workload(task.mod), 1):
            report.tasks_from_database += 1
        else:
            todo.append(task)
    report.tasks_tuned = len(todo)
    progress(f"tvm tuning: {report.tasks} kernels, {report.tasks_from_database} already in {database_dir}")
    if todo:
        rate = seconds_per_trial
        report.estimated_full_tuning_s = len(todo) * 32 * rate
        measured: set[str] = set()
        for round_no in range(1, MAX_ROUNDS + 1):
            remaining = start + budget_s - clock()
            if round_no > 1 and remaining < max(MIN_ROUND_S, 0.1 * budget_s):
                break
            per_task = trials_per_task or max(
                MIN_TRIALS_PER_TASK, min(MAX_TRIALS_PER_TASK, int(remaining / len(todo) / rate)))
            per_iter = max(2, min(16, per_task))
            report.trials_per_task += per_task
            began = clock()
            callback = _tune(todo, target, database, per_task, per_iter, start + budget_s, progress, clock,
                             round_no)
            report.trials += callback.trials
            report.failed_builds += callback.failed_builds
            report.failed_runs += callback.failed_runs
            report.first_error = report.first_error or callback.first_error
            measured |= {todo[i].task_name for i in callback.best}
            if callback.stopped:
                report.notes.append("budget spent before every kernel got all its trials")
                break
            if trials_per_task or callback.trials == 0:
                break
            rate = max(0.1, (clock() - began) / callback.trials)
        report.tasks_measured = len(measured)
        if report.trials and report.failed_builds + report.failed_runs == report.trials:
            raise CompileError(
                f"TVM tuning measured nothing: all {report.trials} trials failed ({report.first_error})",
                hint="rerun with a larger budget, or without --tune-budget for an untuned build")
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if weight_prepack:
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    report.seconds = clock() - start
    progress(f"tvm tuning: {report.summary()}")
    return mod, params, report


def _tune_contexts(todo, work_dir: str, cores: int, small: bool):
    """One TuneContext per task, each with its own search strategy (smaller for small budgets)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    contexts, weights = [], []
    loggers = get_loggers_from_work_dir(work_dir, [t.task_name for t in todo])
    for task, logger, seed in zip(todo, loggers, fork_seed(0, n=len(todo))):
        strategy = (ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=16,
                                                          genetic_num_iters=2)
                    if small else ms.search_strategy.EvolutionarySearch())
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
            search_strategy=strategy, task_name=task.task_name, logger=logger, rand_state=seed,
            num_threads=cores).clone())
        weights.append(float(task.weight))
    return contexts, weights


def _tune(todo, target, database, trials_per_task: int, per_iter: int, deadline: float,
          progress: Callable[[str], None], clock: Callable[[], float], round_no: int = 1):
    """One tune_tasks run over ``todo``; returns the DeadlineProgress callback (counts)."""
    from tvm.s_tir import meta_schedule as ms

    import logging

    PersistentBuilder, DeadlineProgress = _classes()
    seconds = import_tensor_intrin()
    if seconds > 1:
        progress(f"tvm tuning: loaded TVM's tensor intrinsics in {seconds:.0f}s")
    # MetaSchedule prints a table per batch to stdout; our callback reports progress instead.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.ERROR)
    cores = os.cpu_count() or 1
    work_dir = tempfile.mkdtemp(prefix="edgeml-ms-")
    callback = DeadlineProgress(deadline, len(todo), progress, clock)
    builder = PersistentBuilder(max_workers=cores, timeout_sec=120)
    runner = ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False))
    contexts, weights = _tune_contexts(todo, work_dir, cores, small=trials_per_task < 32)
    progress(f"tvm tuning: round {round_no}: {len(todo)} kernels x {trials_per_task} trials, batches of {per_iter}")
    try:
        with _torchless_workers():
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                max_trials_global=trials_per_task * len(todo), max_trials_per_task=trials_per_task,
                num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                task_scheduler="round-robin",
            )
    except Exception as exc:
        raise CompileError(f"TVM tuning failed: {type(exc).__name__}: {str(exc)[:1500]}") from exc
    finally:
        builder.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
    return callback
