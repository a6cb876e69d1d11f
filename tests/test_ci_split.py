"""The split of the README's two test commands: the CPU command runs every test, the simulator command only those
marked ``extras`` (conftest). A test that skips for want of the extras must carry the mark, or no job runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py")

CASES = """
import pytest

@pytest.mark.skipif(True, reason="runs Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1")
def test_unmarked_simulator_skip():
    pass

def test_unmarked_cupy_skip_in_body():
    pytest.skip("CuPy not installed")

@pytest.mark.extras
def test_marked_skip():
    pytest.skip("numba-cuda is not installed")

@pytest.mark.gpu
def test_gpu_skip():
    pytest.skip("CUDA device needed (numba)")

def test_other_skip():
    pytest.skip("megatron-core is not installed")

@pytest.mark.xfail(reason="cupy bug", run=True)
def test_xfail():
    assert False

def test_kernels_fixture_is_marked(kernels):
    pass
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    """A pytester directory with the suite's conftest and markers, run as the CPU job (no simulator)."""
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: g\n    slow: s\n    extras: e\n")
    return pytester


def test_unmarked_extras_skips_fail_and_the_kernels_fixture_marks(suite):
    suite.makepyfile(test_cases=CASES)
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "-rA")
    passed, skipped, failed = ({r.nodeid.split("::")[-1] for r in rs} for rs in result.reprec.listoutcomes())
    assert failed == {"test_unmarked_simulator_skip", "test_unmarked_cupy_skip_in_body"}, result.stdout.str()
    assert "is not marked `extras`" in result.stdout.str()
    # marked extras or gpu, skipped for another reason, an xfail, and the kernels fixture's skip (marked by conftest)
    assert skipped == {
        "test_marked_skip",
        "test_gpu_skip",
        "test_other_skip",
        "test_xfail",
        "test_kernels_fixture_is_marked",
    }
    assert passed == set()

    selected = suite.runpytest_inprocess("-p", "no:cacheprovider", "-m", "extras", "--co", "-q")
    names = {line.split("::")[-1] for line in selected.stdout.lines if "::" in line}
    assert names == {"test_marked_skip", "test_kernels_fixture_is_marked"}, selected.stdout.str()


def test_a_module_that_skips_whole_for_want_of_the_extras_fails(suite):
    suite.makepyfile(
        test_whole="import pytest\npytest.skip('numba-cuda is not installed', allow_module_level=True)\n",
        test_other="import pytest\npytest.skip('megatron-core is not installed', allow_module_level=True)\n",
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    failed = [r.nodeid for r in result.reprec.getreports("pytest_collectreport") if r.failed]
    assert failed == ["test_whole.py"], result.stdout.str()
    assert "skips as a whole without the GPU extras" in result.stdout.str()
