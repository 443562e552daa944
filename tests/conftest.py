"""Test session setup: quiet TensorFlow and 4 logical CPU devices (/cpu:0 ... /cpu:3).

Logical devices must be configured before the TensorFlow runtime starts, so this happens once
per pytest process in ``pytest_configure``. Tests that need a 1-replica run use /cpu:0 only.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-reproducible reductions across runs

NUM_CPU_DEVICES = 4


def pytest_configure(config):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_CPU_DEVICES
    )


_KEY_BASE_STEP = 100_000


def pytest_runtest_setup(item):
    """Gives each test's MirroredStrategies their own collective group keys.

    A CPU MirroredStrategy uses collective all-reduce in TF 2.21; strategies of different sizes
    created by different tests in one process would otherwise reuse group keys and abort
    ("joining a group with size 4, but that group has size 2"). `_collective_key_base` is the
    hook TensorFlow provides for exactly this ("Only set this in tests").
    """
    import tensorflow as tf

    tf.distribute.MirroredStrategy._collective_key_base += _KEY_BASE_STEP
