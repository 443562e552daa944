r"""Goyal et al.'s setup through the goodput model: ResNet-50 on Big Basin servers.

Pure Python (no TensorFlow); part of the goodput model (`tf_largebatch.goodput`). Fed the
paper's figures (about 100 MB of gradients, 8 GPUs a server on NVLink, 50 Gbit/s Ethernet, the
per-GPU step time), the model predicts the scaling efficiency from 8 to 256 GPUs
(`goyal_scaling_efficiency`; the paper reports ~90 %) and the time per iteration
(`goyal_iteration_seconds`).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", §4 and §5.5.
"""

from __future__ import annotations

from tf_largebatch.goodput_allreduce import INTERCONNECTS, gradient_bytes
from tf_largebatch.goodput_throughput import (
    Cluster,
    StepTimeModel,
    scaling_efficiency,
    step_seconds,
)

# Goyal et al. 2017: §4.3 Big Basin servers, 8 Tesla P100 GPUs on NVLink, 50 Gbit Ethernet;
# ResNet-50 ≈ 25.5M float32 parameters (§4.3 rounds to 25M, 100 MB); "backprop for ResNet-50 on
# a single NVIDIA Tesla P100 GPU takes 120 ms" (§4.3); n = 32 images per GPU (§5.1).
GOYAL_NUM_PARAMETERS = 25_500_000
GOYAL_BACKWARD_SECONDS = 0.120
GOYAL_PER_GPU_BATCH = 32
GOYAL_GPUS_PER_SERVER = 8


def goyal_cluster(
    servers: int, topology: str = "hierarchical", overlappable: float = 0.0
) -> Cluster:
    """Goyal et al.'s cluster: ``servers`` Big Basin hosts, 8 P100s on NVLink, 50 GbE.

    Their all-reduce (§4.1) is hierarchical: NCCL inside a server, recursive halving/doubling
    across servers.
    """
    return Cluster(
        workers=servers,
        devices_per_worker=GOYAL_GPUS_PER_SERVER,
        network=INTERCONNECTS["50gbe"],
        intra=INTERCONNECTS["nvlink_p100"],
        topology=topology,
        inter_algorithm="halving_doubling",
        overlappable=overlappable,
    )


def goyal_step_time() -> StepTimeModel:
    """t(32) = 0.18 s: the paper's 120 ms backward pass plus a forward pass of half that.

    Only t(32) matters for weak scaling at 32 images per GPU, so α carries it all.
    """
    return StepTimeModel(GOYAL_BACKWARD_SECONDS * 1.5, 0.0)


def goyal_scaling_efficiency(
    topology: str = "hierarchical", overlappable: float = 0.0, servers: int = 32
) -> float:
    """Predicted scaling efficiency of Goyal et al.'s setup from 1 server (8 GPUs) to ``servers``.

    Goyal et al. report "∼90% scaling efficiency when moving from 8 to 256 GPUs" (abstract,
    §5.5 and Figure 8). With the defaults (hierarchical, no overlap) the model gives 0.856; with
    the all-reduce fully pipelined behind backprop (``overlappable=1``, what their Caffe2/Gloo
    implementation does, §4.2) it gives 1.0, so the paper's 90% lies between the two bounds. A
    single parameter server over the same 50 GbE gives 0.03.

    Example:
      >>> round(goyal_scaling_efficiency(), 3)
      0.856
    """
    p = gradient_bytes(GOYAL_NUM_PARAMETERS)
    return scaling_efficiency(
        goyal_step_time(),
        goyal_cluster(servers, topology, overlappable),
        goyal_cluster(1, topology, overlappable),
        GOYAL_PER_GPU_BATCH,
        p,
    )


def goyal_iteration_seconds(
    servers: int, topology: str = "hierarchical", overlappable: float = 0.0
) -> float:
    """Predicted seconds per iteration of Goyal et al.'s setup at 32 images per GPU.

    Their §5.5 and Figure 7: one epoch (1,281,167 images) takes "over 16 minutes" at kn = 256
    (1 server) and "just 30 seconds" at kn = 11k (44 servers, 352 GPUs), and "the time per
    iteration increases only 12%" over that range. The model: 0.189 s and 0.221 s (+17%),
    i.e. 15.8 min and 25.1 s per epoch.

    Example:
      >>> round(goyal_iteration_seconds(1), 4), round(goyal_iteration_seconds(44), 4)
      (0.189, 0.221)
    """
    cluster = goyal_cluster(servers, topology, overlappable)
    batch = GOYAL_PER_GPU_BATCH * cluster.num_replicas
    return step_seconds(goyal_step_time(), cluster, batch, gradient_bytes(GOYAL_NUM_PARAMETERS))
