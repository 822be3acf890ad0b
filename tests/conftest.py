"""Test set-up: 4 simulated CPU devices (the data-parallel proof needs them) and the real data."""
import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parent.parent


def _find_data_dir():
    env = os.environ.get("SIAMESE_DATA_DIR")
    if env:
        return pathlib.Path(env)
    return _REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """Root holding omniglot/ and mnist/ (laid out as ../shared/data).

    Skips when absent on a developer machine; fails under CI=true, where the data must be there.
    """
    root = _find_data_dir()
    if not (root / "omniglot").is_dir() or not (root / "mnist").is_dir():
        msg = f"real data not found at {root} (set SIAMESE_DATA_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root
