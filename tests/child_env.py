"""XLA_FLAGS for the processes the tests start (trainings, CLIs, the benchmark).

They pick their CPU devices as a user's run does, so the suite's 4 simulated devices (and any device
count in the developer's own XLA_FLAGS) are left out; every other flag is kept, among them the
suite's cheaper LLVM passes (tests/conftest.py), which halve each process's compiles.
"""
import os
import re

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def xla_flags(device_count=None) -> str:
    """This process's XLA_FLAGS without a device count, or with `device_count` simulated devices."""
    flags = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).split()
    if device_count is not None:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return " ".join(flags)
