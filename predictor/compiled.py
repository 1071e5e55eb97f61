"""The bundle's XGBoost model compiled to native code (Treelite + TL2cgen), for the probabilities.

`BundleScorer` asks `load_compiled_model` for a `CompiledModel` when the predictor loads a bundle.
The model is translated to C by TL2cgen (one `if` chain per tree, thresholds and leaf values as
float32 constants, XGBoost's base score and sigmoid), a small batch entry point is added, and gcc
builds a shared library that is called through ctypes: one call per batch, no DMatrix, no
per-call XGBoost set-up. SHAP reason codes stay XGBoost's (`pred_contribs`).

Where and when: at predictor load, on the machine that serves (the library is built for the CPU
and C library it runs on; a bundle therefore stays platform-neutral and carries no native code).
With a cache directory the library is kept there under the SHA-256 of `model.ubj` and the
toolchain's versions, so a restart with the same bundle skips the build; the directory must be
private to the server's user (created 0700; one writable by others is not used, a library from it
would run in the predictor). Without one, each load builds in a private temporary directory.

Safety: before it is used, the compiled model's probabilities are compared with XGBoost's
`inplace_predict` on the bundle's reference feature sample (and rows with missing values); any
difference above `TOLERANCE` - or a missing compiler, a missing package, a build error - logs one
line and the scorer keeps XGBoost (`None` is returned). Inputs are cast to float32 exactly as
XGBoost does (its split conditions compare float32 values), NaN is "missing".
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("kserve.fraud_predictor.compiled")  # KServe configures the kserve.* loggers

#: compiled-model policies: "auto" = compile (or load from the cache), fall back to XGBoost on any
#: failure; "off" = always XGBoost
COMPILED_AUTO = "auto"
COMPILED_OFF = "off"
COMPILED_POLICIES = (COMPILED_AUTO, COMPILED_OFF)
#: largest absolute difference to XGBoost's probability the load-time check accepts
TOLERANCE = 1e-6
#: the cache directory `python -m predictor` uses unless told otherwise (per user, like any build cache)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "fraud-compiled-models"
#: most rows per call scored by the compiled model; larger batches go to XGBoost, whose blocked tree
#: traversal is faster for many rows (benchmarks/bench_compiled_model.py: the compiled model is
#: ~40x faster for one row, 1.5x for 100, 0.7x for 1,000 on a 300-tree model)
MAX_COMPILED_ROWS = 256
#: trees per C translation unit (gcc builds them in parallel and a huge single function is slow to optimise)
TREES_PER_UNIT = 50
COMPILE_TIMEOUT_S = 600.0
#: version of the C this module generates around TL2cgen's (part of the cache key)
CODEGEN_VERSION = "2"

_BATCH_SOURCE = """
#include "header.h"
/* rows x features float32 values with missing = int -1 (NaN), one probability per row */
void fraud_predict_batch(union Entry* data, long rows, long features, float* out) {
  for (long r = 0; r < rows; ++r) {
    float result[N_TARGET * MAX_N_CLASS] = {0};
    predict(data + r * features, 0, result);
    out[r] = result[0];
  }
}
"""


class CompileError(RuntimeError):
    """The model cannot be compiled or does not match XGBoost (the caller falls back)."""


@dataclass(frozen=True)
class CompiledModel:
    library: Path
    num_features: int
    _predict_batch: Callable[..., None]

    def predict(self, values: np.ndarray) -> np.ndarray:
        """Probabilities [n] (float64) of a float64 / float32 feature matrix [n, num_features]."""
        matrix = np.ascontiguousarray(values, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.num_features:
            raise ValueError(f"expected a [n, {self.num_features}] feature matrix, got shape {matrix.shape}")
        missing = np.isnan(matrix)
        if missing.any():
            matrix = matrix.copy()
            matrix.view(np.int32)[missing] = -1
        out = np.empty(len(matrix), dtype=np.float32)
        self._predict_batch(matrix.ctypes.data, len(matrix), self.num_features, out.ctypes.data)
        return out.astype(np.float64)

    def predict_or(self, fallback: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """A predict function: this model for up to MAX_COMPILED_ROWS rows, `fallback` (XGBoost) above."""

        def predict(values: np.ndarray) -> np.ndarray:
            return self.predict(values) if len(values) <= MAX_COMPILED_ROWS else fallback(values)

        return predict


def _toolchain_key() -> str:
    import tl2cgen
    import treelite

    compiler = shutil.which("gcc")
    if compiler is None:
        raise CompileError("gcc is not installed")
    version = subprocess.run(  # noqa: S603 - fixed arguments, compiler path from PATH lookup
        [compiler, "-dumpfullversion"], capture_output=True, text=True, check=False, timeout=30
    ).stdout.strip()
    return f"treelite-{treelite.__version__}/tl2cgen-{tl2cgen.__version__}/gcc-{version}/codegen-{CODEGEN_VERSION}"


def library_path(model_file: Path, cache_dir: Path) -> Path:
    digest = hashlib.sha256(model_file.read_bytes())
    digest.update(_toolchain_key().encode())
    return cache_dir / f"model-{digest.hexdigest()[:32]}.so"


def compile_model(model_file: Path, library: Path) -> None:
    """XGBoost model file -> shared library at `library` (written atomically)."""
    import tl2cgen
    import treelite

    model = treelite.frontend.load_xgboost_model(str(model_file))
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fraud-compile-", dir=library.parent) as tmp:
        source = Path(tmp) / "src"
        units = max(1, -(-model.num_tree // TREES_PER_UNIT))
        tl2cgen.generate_c_code(model, dirpath=str(source), params={"parallel_comp": units} if units > 1 else {})
        base_score_first(source / "main.c")
        (source / "fraud_batch.c").write_text(_BATCH_SOURCE)
        objects = []
        processes = []
        for c_file in sorted(source.glob("*.c")):
            obj = c_file.with_suffix(".o")
            objects.append(str(obj))
            processes.append(
                subprocess.Popen(  # noqa: S603 - fixed compiler arguments on files this function wrote
                    ["gcc", "-O2", "-fPIC", "-std=c99", "-c", str(c_file), "-o", str(obj)],  # noqa: S607 - gcc from PATH, checked by _toolchain_key
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            if len(processes) >= (os.cpu_count() or 1):
                _wait_all(processes)
                processes = []
        _wait_all(processes)
        staged = Path(tmp) / library.name
        _wait_all(
            [
                subprocess.Popen(  # noqa: S603 - fixed linker arguments on files this function wrote
                    ["gcc", "-shared", "-o", str(staged), *objects, "-lm"],  # noqa: S607 - gcc from PATH
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            ]
        )
        os.replace(staged, library)


_BASE_SCORES = re.compile(r"\n  // Apply base_scores\n((?:  result\[\d+\] \+= [^;\n]+;\n)+)")
_PREDICT_START = "void predict(union Entry* data, int pred_margin, float* result) {\n  unsigned int tmp;\n"


def base_score_first(main_c: Path) -> None:
    """Add the base score before the trees, as XGBoost does (TL2cgen adds it after them): float32
    addition is not associative, and with the XGBoost order the sums are the same."""
    text = main_c.read_text()
    found = _BASE_SCORES.search(text)
    if found is None or text.count(_PREDICT_START) != 1:
        raise CompileError("unexpected TL2cgen output (base score or predict() not found)")
    text = text.replace(found.group(0), "\n")
    main_c.write_text(text.replace(_PREDICT_START, _PREDICT_START + found.group(1)))


def _wait_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=COMPILE_TIMEOUT_S)
        if process.returncode != 0:
            text = (output or b"").decode(errors="replace").strip().splitlines()
            raise CompileError(f"gcc failed ({process.returncode}): {text[-1] if text else ''}")


def open_library(library: Path, num_features: int) -> CompiledModel:
    lib = ctypes.CDLL(str(library))
    if lib.get_num_feature() != num_features:
        raise CompileError(f"{library.name} computes {lib.get_num_feature()} features, expected {num_features}")
    function = lib.fraud_predict_batch
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    return CompiledModel(library=library, num_features=num_features, _predict_batch=function)


def private_dir(path: Path) -> Path | None:
    """`path`, created 0700 if missing, when only this user can write it; else None (with a warning)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
    except OSError as exc:
        logger.warning("compiled-model cache %s unusable (%s); building in a temporary directory", path, exc)
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        logger.warning("compiled-model cache %s is writable by others; building in a temporary directory", path)
        return None
    return path


def check_rows(reference: np.ndarray | None, num_features: int) -> np.ndarray:
    """Rows the compiled model is checked on: the bundle's reference sample plus the same rows with
    every feature missing in turn (the default branches)."""
    rng = np.random.default_rng(0)
    base = (
        np.asarray(reference, dtype=np.float64)
        if reference is not None and len(reference)
        else rng.gamma(1.0, 10.0, size=(64, num_features))
    )
    holed = base[: min(len(base), 32)].copy()
    for i in range(len(holed)):
        holed[i, i % num_features] = np.nan
    return np.vstack([base, holed, np.full((1, num_features), np.nan)])


def load_compiled_model(
    model_file: Path,
    booster_predict: Callable[[np.ndarray], np.ndarray],
    num_features: int,
    reference: np.ndarray | None,
    cache_dir: Path | None = None,
) -> CompiledModel | None:
    """A compiled model equal to `booster_predict` within TOLERANCE on the check rows, or None
    (with one log line saying why) when it cannot be built, loaded or does not match."""
    started = time.perf_counter()
    scratch: str | None = None
    try:
        cache = private_dir(cache_dir) if cache_dir is not None else None
        if cache is None:
            scratch = tempfile.mkdtemp(prefix="fraud-compiled-")
        library = library_path(model_file, Path(cache or scratch or "."))
        cached = library.is_file()
        if not cached:
            compile_model(model_file, library)
        compiled = open_library(library, num_features)
        rows = check_rows(reference, num_features)
        difference = float(np.max(np.abs(compiled.predict(rows) - np.asarray(booster_predict(rows), dtype=np.float64))))
        if not difference <= TOLERANCE:
            raise CompileError(f"probabilities differ from XGBoost's by {difference:.3g} (> {TOLERANCE:g})")
    except ImportError as exc:
        logger.warning("compiled model unavailable (%s); scoring with XGBoost", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: keep XGBoost, say why in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        logger.warning("compiled model unavailable (%s: %s); scoring with XGBoost", type(exc).__name__, first)
        return None
    finally:
        if scratch is not None:  # the loaded library stays mapped after its file is removed
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "compiled model %s (%s in %.1f s; max difference to XGBoost %.2g on %d rows)",
        library.name,
        "cached" if cached else "built",
        time.perf_counter() - started,
        difference,
        len(rows),
    )
    return compiled
