"""The suite's guard against tests that write into the repository (``repo_guard.repository_unchanged``) can fail."""

from pathlib import Path

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent


def run_inner_session(pytester, test_body: str):
    pytester.makeini("[pytest]\n")  # the inner rootdir: the pytester directory, standing in for a repository
    pytester.makeconftest("from repo_guard import repository_unchanged  # noqa: F401\n")
    pytester.makepyfile(test_inner=test_body)
    pytester.syspathinsert(str(TESTS))
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_a_test_writing_into_the_repository_fails_the_run(pytester):
    result = run_inner_session(pytester, (
        "def test_writes(request):\n"
        "    (request.config.rootpath / 'results.json').write_text('{}')\n"
        "    (request.config.rootpath / 'runs').mkdir()\n"
        "    (request.config.rootpath / 'runs' / 'x.pt').write_bytes(b'x')\n"
    ))
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the tests changed the repository tree*added results.json, added runs/x.pt*"])
    assert result.ret != 0


def test_a_test_changing_a_file_fails_the_run(pytester):
    pytester.makefile(".txt", notes="before")
    result = run_inner_session(pytester, (
        "import os\n"
        "def test_edits(request):\n"
        "    path = request.config.rootpath / 'notes.txt'\n"
        "    path.write_text('after!')\n"
    ))
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*changed notes.txt*"])


def test_a_test_writing_under_tmp_path_passes(pytester):
    result = run_inner_session(pytester, "def test_writes(tmp_path):\n    (tmp_path / 'results.json').write_text('{}')\n")
    result.assert_outcomes(passed=1)
    assert result.ret == 0
