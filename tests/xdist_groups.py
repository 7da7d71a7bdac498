"""`--dist loadgroup` (`make test`) under pytest 9.2: tests of one `xdist_group` on one
worker again.

pytest-xdist 3.8 groups a test by the `@GROUP` it appends to the test's `_nodeid`, which
pytest 9.2 no longer reads (a node's id is its `_id`): every group was ignored, its tests
spread over the workers. Three workers then compiled the Node client at once, each
rewriting clients/node/dist under the others' scenarios (and took 15 s to, each), and the
local model's tests ran side by side on the 2 cores they are each meant to have.
"""

from __future__ import annotations

import pytest


class GroupedNodeIds:
    """Sets each test's id to the one xdist gave it for its group, after xdist."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            grouped = item.__dict__.get("_nodeid")
            if isinstance(grouped, str) and grouped != item.nodeid:
                from _pytest.nodeid import NodeId  # pytest >= 9.2, where it is needed

                item._id = NodeId.parse(grouped)  # type: ignore[attr-defined]
