"""Helpers several test modules share (imported as ``from _helpers import ...``: pytest puts
this directory on ``sys.path``)."""

import tensorflow as tf


def mirrored(replicas):
    """One device for 1 replica, else a MirroredStrategy over /cpu:0.. that reduces on one
    device (as `distribute.make_strategy` does on CPUs: several strategies of different sizes
    in one process would otherwise clash over collective group keys)."""
    devices = [f"/cpu:{i}" for i in range(replicas)]
    if replicas == 1:
        return tf.distribute.OneDeviceStrategy(devices[0])
    return tf.distribute.MirroredStrategy(devices, tf.distribute.ReductionToOneDevice())


class Dying:
    """Wraps the compiled step; raises after `calls` calls, like a process killed mid-run."""

    def __init__(self, step, calls):
        self.step, self.calls = step, calls

    def __call__(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("killed")
        return self.step(*args)

    def __getattr__(self, name):
        return getattr(self.step, name)
