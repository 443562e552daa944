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
