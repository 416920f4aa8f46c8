"""Fixtures for every test."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models in the tests are tiny: on a 2-core machine, handing each small op to a thread pool costs far more
    # than the maths (measured under load: 12 s vs 0.4 s for one video UNet forward). Results are compared exactly
    # only between runs in this same setting, else with tolerances.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
