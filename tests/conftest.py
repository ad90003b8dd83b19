"""Test-wide settings: quiet TF, CPU only, small thread pools (the CI machine has 2 cores)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (multi-process or many steps)")


@pytest.fixture(autouse=True)
def _clear_keras_session():
  import keras
  keras.utils.clear_session()
  yield
