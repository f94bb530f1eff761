"""Only for `pytest -p no:twisted tests`: trial TestCase.mktemp() writes relative to the working
directory, so run each test in its own temporary directory instead of the checkout."""

import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
