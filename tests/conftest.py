"""Test configuration: 8 fake CPU devices, short compile times and a persistent compilation cache, the image
folders the data, CLI and training tests read, and what CI requires.

The JAX settings must be made before JAX initialises its backends, so they live here, at import time of the
test session, in the environment (the CLI subprocesses the tests start inherit them).

In CI (`CI=true`, as .ci/run runs) nothing may pass by skipping: a missing PyTorch peer (torch) or missing
shared data (../shared/data beside the checkout) stops the run at its start, naming what is missing, and any
test that skips anyway fails with its reason. Locally such tests skip, with the reason (`-ra` lists them).
"""

import atexit
import importlib.util
import os
import shutil
import signal
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models and data: compile time dominates, so compile unoptimised (the flax examples do the same).
# Set in the environment so the CLI subprocesses the tests start inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# JAX's persistent compilation cache, shared by every test and CLI subprocess of the session: most tests build
# their steps anew (new Python functions, the same programs), which the in-memory cache cannot reuse but this
# one, keyed by the program, can. Every entry is kept, however small or fast to compile. .ci/run points
# DEBKD_TEST_XLA_CACHE at a folder kept between its runs; otherwise a fresh folder per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set by a parent session: share its cache
    if not os.environ.get("DEBKD_TEST_XLA_CACHE"):
        os.environ["DEBKD_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="debkd-test-xla-cache-")
        atexit.register(shutil.rmtree, os.environ["DEBKD_TEST_XLA_CACHE"], ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["DEBKD_TEST_XLA_CACHE"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from debkd_jax import processes  # noqa: E402

jax.config.update("jax_enable_x64", False)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "dogs_vs_cats_32"


def missing_requirements() -> list[str]:
    """What the full suite needs beyond the package's own dependencies and is not here, each with its fix."""
    missing = []
    if importlib.util.find_spec("torch") is None:
        missing.append("torch, the PyTorch peer (pip install torch==2.13.0, or pip install -e .[peer])")
    if not SHARED_DATA.is_dir():
        missing.append(f"the shared data {SHARED_DATA} (../shared/data beside the checkout)")
    return missing


def pytest_sessionstart(session):
    if IN_CI and (missing := missing_requirements()):
        pytest.exit(f"CI=true and the suite's requirements are missing: {'; '.join(missing)}", returncode=3)


def _fail_skip_in_ci(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true runs every check, and this one skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())

def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# Python's own helpers live as long as the process that started them (multiprocessing's resource tracker).
_SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(scope="module", autouse=True)
def no_child_process_outlives_its_module():
    """Every child process a test module started has ended when the module ends: a leftover one is killed
    (its whole group) and the module errors, naming it. (A child started through `debkd_jax.processes` also
    dies with the test process itself, e.g. when pytest-timeout ends a worker.)"""
    before = set(processes.descendants())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in processes.descendants() if p not in before
                and not any(h in _command_line(p) for h in _SESSION_HELPERS)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        commands = [f"{p}: {_command_line(p)[:160]}" for p in left]
        for p in left:
            try:  # its own group when it leads one (never the test process's group)
                os.killpg(p, signal.SIGKILL) if os.getpgid(p) == p else os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pytest.fail(f"{len(left)} child process(es) outlived the test module and were killed: {commands}")


# pytest-xdist (`-n 2 --dist loadfile --no-loadscope-reorder`) hands out whole modules in collection order.
# The modules that run several CLI processes at a time go first, longest first (as measured in a suite run):
# the two workers start on them and the many short modules fill in at the end, so neither waits on a long one.
LONGEST_MODULES = (
    "test_multihost.py",
    "test_cli.py",
    "test_multihost_faults.py",
    "test_stream_cli.py",
    "test_bench.py",
    "test_folds.py",
)


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


# The generated folder: two classes of 32x32 images, half JPEG and half PNG.
SHAPE_CLASSES = ("disc", "bar")
SHAPES_PER_CLASS = 150
SHAPES_MISLABELED = 0.08  # share of each class folder holding the other class's pattern


def draw_shape_image(shape: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 image: a noisy random background with a warm filled disc (`disc`) or a cool
    vertical bar (`bar`) of random position, size and shade, plus per-pixel Gaussian noise (sigma 20)."""
    background = rng.integers(40, 140, size=3)
    image = np.broadcast_to(background, (size, size, 3)).astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(8, size - 8, size=2)
    if shape == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(5, 9) ** 2
        colour = (rng.integers(170, 256), rng.integers(60, 140), rng.integers(0, 60))
    else:
        mask = (np.abs(xx - cx) <= rng.integers(2, 4)) & (np.abs(yy - cy) <= rng.integers(8, 13))
        colour = (rng.integers(0, 60), rng.integers(60, 140), rng.integers(170, 256))
    image[mask] = colour
    image += rng.normal(0.0, 20.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_shape_folder(root: pathlib.Path, per_class: int = SHAPES_PER_CLASS, seed: int = 0) -> pathlib.Path:
    """Writes `root/<class>/<class>_<i>.jpg|png` for the classes `SHAPE_CLASSES`, `per_class` images each,
    alternating JPEG (quality 90) and PNG. A seeded `SHAPES_MISLABELED` share of each class folder holds the
    other class's pattern, so no classifier is perfect on it (a teacher has mistakes to infuse or rectify)."""
    rng = np.random.default_rng(seed)
    n_mislabeled = int(round(SHAPES_MISLABELED * per_class))
    for label, name in enumerate(SHAPE_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        drawn_as = np.full(per_class, label)
        drawn_as[rng.choice(per_class, n_mislabeled, replace=False)] = 1 - label
        for i, shape_index in enumerate(drawn_as):
            image = Image.fromarray(draw_shape_image(SHAPE_CLASSES[shape_index], rng))
            if i % 2:
                image.save(folder / f"{name}_{i}.png")
            else:
                image.save(folder / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> pathlib.Path:
    """A generated image folder, `disc/` and `bar/`, 150 images each (half JPEG, half PNG, 32x32 RGB; 8% of
    each folder drawn as the other class). The tiny models learn it in a few epochs (test_train.py measures
    it)."""
    return write_shape_folder(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="session")
def dogs_vs_cats_dir():
    """The real 32x32 Dogs vs Cats images beside the checkout (../shared/data); skipped if absent (in CI a
    failure)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA's optimisations off for a module's compiles (seconds instead of tens of seconds on 2 cores); a
    module opts in with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
