"""Markers that keep downloads and end-to-end runs out of the default test run.

``network``: the test needs a data set that may have to be downloaded (MNIST and the foolbox
samples come from PyPI; once in the cache nothing is fetched again, but a fresh machine
downloads). Marked automatically by the fixtures that fetch, and by hand where a test names a
downloadable data set itself. ``integration``: end-to-end runs of the command-line tool on
zoo models or image folders (seconds each). ``slow``: minutes.

The default run (``bash scripts/test.sh``) leaves all three out; ``.ci/run`` adds ``network``
and ``integration``; ``-m slow`` runs the long ones.
"""

from __future__ import annotations

import pytest

#: Fixtures whose setup fetches a data set into the cache.
NETWORK_FIXTURES = frozenset({"mnist_dir", "mnist_train", "mnist_test", "foolbox_dir"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)
