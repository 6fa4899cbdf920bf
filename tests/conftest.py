"""Shared test helpers: where the Caffe reference fixtures live, and how their absence is handled."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws new ones, to hunt for more.
settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "caffe-reference"  # copied from what real Caffe and its forks computed
PAPER_MODEL = FIXTURES / "paper-model"  # the paper's own prototxts, as released


def require(path: Path) -> Path:
    """Return `path`, failing (never skipping) when the checkout lacks it: the fixtures are
    part of the repository, so a missing one is a broken checkout."""
    if not path.exists():
        pytest.fail(f"needs {path}: a fixture the repository should carry (tests/fixtures)")
    return path


def run_cli(*args, cwd):
    """`caffe-compat ARGS` in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "caffe_compat", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def run_python(code: str, *args, **options) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` in a subprocess, output captured, run from a folder outside the
    checkout unless `cwd` is given: from the checkout's root, `import caffe_compat` would
    find the source tree (whose proto/ and converters/ install elsewhere) instead of the
    installed package."""
    options.setdefault("cwd", tempfile.gettempdir())
    options.setdefault("capture_output", True)
    options.setdefault("text", True)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], **options)


class Hang(Exception):
    """An example of a property test ran past its bound (`bounded`)."""


@contextlib.contextmanager
def bounded(seconds: float):
    """Fail with Hang when the block runs past `seconds` (SIGALRM: a hang in C code ends too)."""
    expired = []

    def expire(*_):
        expired.append(True)
        raise Hang(f"one example ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:  # raised where it could be swallowed (a gc callback, a destructor): fail anyway
        raise Hang(f"one example ran past {seconds} s")


def free_port() -> int:
    """A localhost port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reference() -> Path:
    return require(REFERENCE)


DEMO_ITERATIONS = 20  # the demo's default 500 take about a minute


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(the folder `caffe-compat demo` wrote, its stdout), run once per session, shortened;
    test_demo checks it, test_readme runs the README's commands beside it."""
    pytest.importorskip("sklearn", reason="the demo's digits come with scikit-learn (the test extra)")
    base = tmp_path_factory.mktemp("demo")
    result = run_cli("demo", "--workdir", "caffe-compat-demo", "--iterations", DEMO_ITERATIONS, cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base / "caffe-compat-demo", result.stdout


_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report):
    # A module skipped whole (importorskip at import time, allow_module_level) reports
    # here, not through pytest_runtest_logreport.
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    # In CI nothing may skip: every dependency is installed and the fixtures are present.
    if os.environ.get("CI") and _skipped and exitstatus == 0:
        print(f"\nCI: {len(_skipped)} test(s) skipped, which CI does not allow: " + ", ".join(_skipped[:10]))
        session.exitstatus = 1
