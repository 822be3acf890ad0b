"""Test set-up: 4 simulated CPU devices (the data-parallel proof needs them) and the real data."""
import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax is imported anywhere.
# LLVM's cheaper passes: the suite compiles thousands of small programs, in this process, its xdist
# workers and the ~100 processes it starts (they keep these flags: tests/child_env.py), and LLVM's
# default optimisation is ~40% of each compile. Measured (BUILD_NOTES, "Suite, stop 47"): the CPU
# default's step compiles in 6.5 s instead of 11.4 and runs at the same speed, and the values are the
# same bit for bit (train-step losses of every benchmark row, the shipped models' embeddings, the
# mining losses) but for one row's 4th step (4 x conv-128, 6e-6 relative). A developer's own
# --xla_backend_optimization_level wins (XLA_FLAGS=--xla_backend_optimization_level=3 tests at
# XLA's default).
_COMPILE_FAST = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (_COMPILE_FAST + " " + os.environ.get("XLA_FLAGS", "")).strip()
# Appended to a developer's own XLA_FLAGS, last, as
# XLA takes the last of a repeated flag (setdefault dropped the 4 devices whenever XLA_FLAGS was
# set, and a count of 1 or 2 there failed the 1-vs-4-device tests).
_FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
if not os.environ.get("XLA_FLAGS", "").endswith(_FOUR_DEVICES):  # the xdist workers import this file too
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FOUR_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# NumPy asks the kernel for 2 MB pages for every large array (madvise). On the project's VMs such a
# page fault often costs ~16 ms, so unpacking the Omniglot cache (212 MB) took 0.04 s or 2 s by luck,
# and a tiny training spent 5-7 s in the kernel instead of 2.5 (BUILD_NOTES, "Suite, stop 42").
# Only page sizes change, no result. Inherited by the xdist workers and every process the tests start.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")



def _session_dir(variable: str, prefix: str) -> None:
    """Points `variable` at a temporary directory made by the first process to import this file
    (pytest's controller; the xdist workers and every process the tests start inherit it) and
    removed when that process exits. A directory a developer already set is kept. The directory's
    name carries the controller's pid: a suite killed by a signal runs no atexit, and the next one
    removes what a dead controller left (a SIGTERMed suite used to leave ~200 MB per run)."""
    if variable not in os.environ:
        _remove_dead_sessions_dirs(prefix)
        path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
        os.environ[variable] = path
        atexit.register(shutil.rmtree, path, True)


def _remove_dead_sessions_dirs(prefix: str) -> None:
    for entry in pathlib.Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = entry.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # alive (or another user's): kept
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# One persistent XLA compilation cache for the whole session, shared by the xdist workers and by
# every process the tests start (trainings, CLIs): ~70 processes compile the same tiny programs,
# and a training that finds its step and evaluation compiled starts in half the time. Entries are
# keyed on the program, XLA flags and versions, so a hit is the executable a compile would give.
# No size limit, so no lock: a reader that meets an entry being written gets a warning and compiles.
_session_dir("JAX_COMPILATION_CACHE_DIR", "siamese-jax-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The decoded-dataset cache likewise, so the suite writes nothing into the developer's
# ~/.cache/siamese_jax (in-process trainings wrote ~80 MB there) and a second run starts as the
# first did.
_session_dir("SIAMESE_CACHE_DIR", "siamese-jax-tests-data-cache-")

import importlib  # noqa: E402

import pytest  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parent.parent
# The processes the tests start (trainings, CLIs) import this checkout too, whatever their working
# directory: setup.cfg's `pythonpath = .` reaches pytest's own process only, and a second checkout
# sharing the venv would otherwise run the editable install's code in its subprocesses.
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(_REPO):  # once, not again per xdist worker
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))

# Hypothesis keeps its examples in the checkout's .hypothesis/ (ignored by git), not in whatever
# directory pytest was started from. Its home too: the cache of constants it collects from the code
# (constants/) went to the starting directory's .hypothesis/ (pytest run from /tmp wrote /tmp/.hypothesis).
from hypothesis import settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

set_hypothesis_home_dir(str(_REPO / ".hypothesis"))
settings.register_profile("siamese", database=DirectoryBasedExampleDatabase(str(_REPO / ".hypothesis" / "examples")))
settings.load_profile("siamese")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _find_data_dir():
    env = os.environ.get("SIAMESE_DATA_DIR")
    if env:  # absolute: tests run commands from other directories (README's ../shared/data broke them)
        return pathlib.Path(env).expanduser().resolve()
    return _REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """Root holding omniglot/ and mnist/ (laid out as ../shared/data).

    Skips when absent on a developer machine; fails under CI=true, where the data must be there.
    """
    root = _find_data_dir()
    if not (root / "omniglot").is_dir() or not (root / "mnist").is_dir():
        msg = f"real data not found at {root} (set SIAMESE_DATA_DIR)"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def require():
    """`require("tensorflow")` returns the module. Where it is not installed the test is skipped,
    except under CI=true, which installs every optional module the tests use (tensorflow,
    tensorflow_datasets, torch): there a missing one fails the test rather than skipping it unseen."""
    def _require(name: str):
        return importlib.import_module(name) if _in_ci() else pytest.importorskip(name)

    return _require
