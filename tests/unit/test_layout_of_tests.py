"""The suite's own layout: pytest imports tests/unit and tests/e2e as one rootdir-based
tree (no packages), so two test files with one basename stop the whole collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_file_basenames_are_unique_across_the_suite():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    assert [name for name, count in names.items() if count > 1] == []
