"""The op tests run the fused ops with tiny cache blocks (a row or two each), so every test's arrays cross many
block boundaries; tests outside tests/functional run the default block size."""

import pytest

from tinytf.functional import common


@pytest.fixture(autouse=True, scope="module")
def tiny_cache_blocks():
    default = common.BLOCK_BYTES
    common.BLOCK_BYTES = 16
    yield
    common.BLOCK_BYTES = default
