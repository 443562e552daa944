"""Distribution strategies by name, logical CPU devices, TF_CONFIG and Slurm.

:func:`make_strategy` turns a strategy name and an all-reduce name into a
``tf.distribute.Strategy``. Multi-worker runs read their cluster from TF_CONFIG, which
:func:`build_tf_config` writes, :func:`validate_tf_config` checks and :func:`tf_config_from_slurm`
derives from a Slurm job step. :func:`is_chief` / :func:`worker_info` pick the writing process.
Without GPUs, :func:`configure_cpu_devices` gives ``MirroredStrategy`` N logical CPU replicas.

References:
  TensorFlow guide, "Multi-worker training with Keras" (TF_CONFIG, the chief worker).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
from absl import logging
from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as _slurm

from tf_largebatch._validation import _fail, check_choice, check_positive_int

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
ALL_REDUCE = ("auto", "ring", "nccl")
_TASK_TYPES = ("worker", "chief")
_SLURM_FALLBACKS = {  # job-step variable (set by srun) -> job variable (set in an sbatch script)
    "SLURM_STEP_NUM_TASKS": "SLURM_NTASKS",
    "SLURM_STEP_NODELIST": "SLURM_JOB_NODELIST",
    "SLURM_STEP_TASKS_PER_NODE": "SLURM_TASKS_PER_NODE",
}


def _cpu_device_count() -> int:
    """Logical CPU devices configured (without initialising the runtime)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    return len(tf.config.get_logical_device_configuration(cpu) or [None])


def configure_cpu_devices(num_cpu_devices: int) -> None:
    """Splits the physical CPU into ``num_cpu_devices`` logical devices ``/cpu:0 ...``.

    Lets ``MirroredStrategy`` run several replicas without GPUs. Call it before the TensorFlow
    runtime initialises (before any op, dataset or strategy).

    Raises:
      ValueError: ``num_cpu_devices`` is not a positive integer.
      RuntimeError: the runtime is already initialised with another count (same count: no-op).

    Example:
      >>> configure_cpu_devices(4)  # then make_strategy("mirrored") has 4 replicas
    """
    check_positive_int("num_cpu_devices", num_cpu_devices)
    current = _cpu_device_count()
    if current == num_cpu_devices:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into num_cpu_devices={num_cpu_devices} logical devices: the "
            f"TensorFlow runtime is already initialised with {current}. Call "
            "configure_cpu_devices() at program start, before any TensorFlow op or strategy."
        ) from error
    logging.info("Split the CPU into %d logical devices.", num_cpu_devices)


def _local_devices() -> list[str]:
    """All GPUs, or without GPUs all logical CPU devices."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def make_strategy(
    name: str = "auto",
    *,
    num_cpu_devices: int | None = None,
    all_reduce: str = "auto",
    devices: Sequence[str] | None = None,
    cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
) -> tf.distribute.Strategy:
    """Builds a distribution strategy by name.

    - ``"auto"``: ``"multi_worker"`` if ``cluster_resolver`` is given or TF_CONFIG names more
      than one chief/worker task; else ``"mirrored"`` with more than one GPU, logical CPU device
      or entry in ``devices``; else ``"one_device"``.
    - ``"one_device"``: ``OneDeviceStrategy`` on ``devices[0]``, or the first GPU, or ``/cpu:0``.
    - ``"mirrored"``: ``MirroredStrategy`` over ``devices``, or all GPUs, or all logical CPUs.
      ``all_reduce``: ``"auto"`` lets TensorFlow choose (NCCL on GPUs, ``CollectiveAllReduce``
      on CPUs in TF 2.21); ``"nccl"``: ``NcclAllReduce`` (GPUs only); ``"ring"``:
      ``HierarchicalCopyAllReduce``, the non-NCCL option (a tree: MirroredStrategy has no ring).
    - ``"multi_worker"``: ``MultiWorkerMirroredStrategy`` with collective implementation
      ``AUTO``/``RING``/``NCCL``, after validating TF_CONFIG (unless ``cluster_resolver``).
      Create it at program start: it must configure collectives before any other op runs.

    Args:
      name: one of :data:`STRATEGIES`.
      num_cpu_devices: if given, :func:`configure_cpu_devices` runs first.
      all_reduce: one of :data:`ALL_REDUCE`.
      devices: explicit devices for ``"one_device"`` (one) or ``"mirrored"``.
      cluster_resolver: for ``"multi_worker"`` (e.g. :func:`slurm_cluster_resolver`).

    Raises:
      ValueError: unknown ``name`` or ``all_reduce``, ``"nccl"`` for mirrored without GPUs, bad
        ``devices``, or a malformed TF_CONFIG.
      RuntimeError: ``"multi_worker"`` requested after the TensorFlow runtime started.

    Example:
      >>> make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"]).num_replicas_in_sync
      2
    """
    check_choice("name", name, STRATEGIES)
    check_choice("all_reduce", all_reduce, ALL_REDUCE)
    if devices is not None and (isinstance(devices, str) or not devices):
        _fail("devices", "a non-empty list of device names", devices)
    if num_cpu_devices is not None:
        configure_cpu_devices(num_cpu_devices)
    if name == "auto":
        cluster = validate_tf_config()["cluster"] if os.environ.get("TF_CONFIG") else {}
        num_tasks = sum(len(cluster.get(task_type, [])) for task_type in _TASK_TYPES)
        if cluster_resolver is not None or num_tasks > 1:
            name = "multi_worker"
        elif devices is not None:
            name = "mirrored" if len(devices) > 1 else "one_device"
        else:
            many = len(tf.config.list_physical_devices("GPU")) > 1 or _cpu_device_count() > 1
            name = "mirrored" if many else "one_device"
    logging.info("Strategy %r with all_reduce=%r.", name, all_reduce)
    if name == "multi_worker":
        if devices is not None:
            _fail("devices", "None for name='multi_worker'", devices)
        if cluster_resolver is None:
            validate_tf_config()
        implementation = tf.distribute.experimental.CommunicationImplementation[all_reduce.upper()]
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver, options)
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}: create make_strategy('multi_worker') at program start, before any "
                "other TensorFlow op, dataset or model."
            ) from error
    if name == "one_device":
        if devices is not None and len(devices) != 1:
            _fail("devices", "a single device for name='one_device'", devices)
        device = devices[0] if devices is not None else _local_devices()[0]
        return tf.distribute.OneDeviceStrategy(device)
    devices = list(devices) if devices is not None else _local_devices()
    cross_device_ops: tf.distribute.CrossDeviceOps | None = None
    if all_reduce == "nccl":
        if not all("GPU" in d.upper() for d in devices):
            _fail("all_reduce", "'auto' or 'ring' on CPU devices (NCCL needs GPUs)", all_reduce)
        cross_device_ops = tf.distribute.NcclAllReduce()
    elif all_reduce == "ring":
        cross_device_ops = tf.distribute.HierarchicalCopyAllReduce()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def worker_info(strategy: tf.distribute.Strategy) -> tuple[str, int]:
    """This process's ``(task_type, task_id)`` in the cluster; ``("worker", 0)`` for one process."""
    resolver = strategy.cluster_resolver
    if resolver is None or resolver.task_type is None:
        return "worker", 0
    return str(resolver.task_type), int(resolver.task_id)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, summaries and results.

    The chief is the ``"chief"`` task if the cluster has one, else worker 0; a single-process
    strategy is always chief. Other workers must still run every collective op (for example save
    to a temporary directory) but must not write shared files.
    """
    task_type, task_id = worker_info(strategy)
    resolver = strategy.cluster_resolver
    has_chief = resolver is not None and "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)


def _is_address(address: Any) -> bool:
    """Whether ``address`` is ``"host:port"`` with a port in 1..65535."""
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _invalid(reason: str, value: Any) -> None:
    shown = value if isinstance(value, str) else json.dumps(value, default=repr)
    shown = " ".join(str(shown).split())
    shown = shown if len(shown) <= 300 else shown[:297] + "..."
    raise ValueError(f"Invalid TF_CONFIG: {reason}. Received: TF_CONFIG={shown}")


def validate_tf_config(value: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parses and checks a TF_CONFIG value.

    TF_CONFIG is a JSON object ``{"cluster": {task_type: ["host:port", ...]}, "task": {"type":
    task_type, "index": i}}``. An ``"evaluator"`` task may be absent from the cluster.

    Args:
      value: the JSON string or parsed dict; None reads ``os.environ["TF_CONFIG"]``.

    Returns:
      The parsed dict.

    Raises:
      ValueError: one line, ``Invalid TF_CONFIG: <reason>. Received: TF_CONFIG=<value>``, for a
        missing variable, malformed JSON, no ``"cluster"`` or ``"task"``, an address that is not
        ``"host:port"``, a task type not in the cluster, a bad or out-of-range task index.
    """
    value = os.environ.get("TF_CONFIG", "") if value is None else value
    if isinstance(value, str) and not value.strip():
        _invalid("empty or not set", value)
    if isinstance(value, str):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as error:
            _invalid(f"malformed JSON ({error.msg} at character {error.pos})", value)
    elif isinstance(value, Mapping):
        config = json.loads(json.dumps(dict(value), default=repr))
    else:
        _invalid("expected a JSON string or a dict", value)
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        _invalid('missing "cluster" (a mapping from task type to "host:port" lists)', value)
    for task_type, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            _invalid(f'cluster["{task_type}"] must be a non-empty list of addresses', value)
        for address in addresses:
            if not _is_address(address):
                _invalid(f'address {address!r} in cluster["{task_type}"] is not "host:port"', value)
    task = config.get("task")
    if not isinstance(task, dict) or not task:
        _invalid('missing "task" (a mapping with "type" and "index")', value)
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster and task_type != "evaluator":
        _invalid(f"task type {task_type!r} is not in the cluster {sorted(cluster)}", value)
    num_tasks = len(cluster.get(task_type, [None]))
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_tasks:
        _invalid(f"task index {index!r} is not in [0, {num_tasks}) for {task_type!r}", value)
    return config


def build_tf_config(
    workers: Sequence[str], task_index: int, task_type: str = "worker", chief: str | None = None
) -> dict[str, Any]:
    """Builds the TF_CONFIG dict for one task of a worker (and optional chief) cluster.

    Args:
      workers: worker addresses, ``"host:port"``.
      task_index: this task's index within ``task_type`` (0 for the chief).
      task_type: ``"worker"`` or ``"chief"``.
      chief: the chief's address; None for a cluster where worker 0 is chief.

    Returns:
      ``{"cluster": {["chief": [chief],] "worker": workers}, "task": {"type", "index"}}``.

    Raises:
      ValueError: naming the bad argument.

    Example:
      >>> build_tf_config(["localhost:2222", "localhost:2223"], 1)["task"]
      {'type': 'worker', 'index': 1}
    """
    if isinstance(workers, str) or not workers or not all(_is_address(w) for w in workers):
        _fail("workers", 'a non-empty list of "host:port" addresses', workers)
    check_choice("task_type", task_type, _TASK_TYPES)
    if chief is not None and not _is_address(chief):
        _fail("chief", 'a "host:port" address or None', chief)
    if task_type == "chief" and chief is None:
        _fail("chief", "an address when task_type='chief'", chief)
    n = len(workers) if task_type == "worker" else 1
    if isinstance(task_index, bool) or not isinstance(task_index, int) or not 0 <= task_index < n:
        _fail("task_index", f"an integer in [0, {n}) for {n} {task_type} task(s)", task_index)
    cluster: dict[str, list[str]] = {} if chief is None else {"chief": [chief]}
    cluster["worker"] = list(workers)
    task = {"type": task_type, "index": task_index}
    return validate_tf_config({"cluster": cluster, "task": task})


def tf_config_json(
    workers: Sequence[str], task_index: int, task_type: str = "worker", chief: str | None = None
) -> str:
    """:func:`build_tf_config` as the JSON string to put in the TF_CONFIG environment variable."""
    return json.dumps(build_tf_config(workers, task_index, task_type, chief))


def _count_gpus(env: Mapping[str, str]) -> int:
    """GPUs on this node from CUDA_VISIBLE_DEVICES or ``nvidia-smi``, without starting CUDA."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",")]
        return len([d for d in ids if d and not d.startswith("-")])
    try:
        return _slurm.get_num_gpus()  # nvidia-smi --list-gpus
    except (OSError, RuntimeError):  # no nvidia-smi: a CPU node
        return 0


class _SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """``SlurmClusterResolver`` reading a given environment, with job-variable fallbacks.

    Also works on CPU-only nodes, where TensorFlow's divides zero GPUs among tasks and lists none.
    """

    def __init__(self, env: Mapping[str, str], gpus_per_node: int | None, **kwargs: Any):
        check_positive_int("port_base", kwargs["port_base"])
        if kwargs["port_base"] > 65535:
            _fail("port_base", "<= 65535", kwargs["port_base"])
        self._env = dict(env)
        for step_name, job_name in _SLURM_FALLBACKS.items():
            if step_name not in self._env and job_name in self._env:
                self._env[step_name] = self._env[job_name]
        if gpus_per_node is None:
            gpus_per_node = _count_gpus(self._env)
        self._cpu_only = gpus_per_node == 0
        if self._cpu_only:  # one pseudo-GPU slot per task so that every task gets a port
            gpus_per_node = self._resolve_num_tasks()
            kwargs.update(gpus_per_task=1, auto_set_gpu=False)
        super().__init__(gpus_per_node=gpus_per_node, **kwargs)

    def _slurm_var(self, name: str) -> str:
        if f"SLURM_{name}" not in self._env:
            raise ValueError(f"SLURM_{name} is not set: not running inside a Slurm job step?")
        return self._env[f"SLURM_{name}"]

    def _resolve_own_rank(self) -> int:
        return int(self._slurm_var("PROCID"))

    def _resolve_num_tasks(self) -> int:
        return int(self._slurm_var("STEP_NUM_TASKS"))

    def _resolve_hostlist(self) -> list[str]:
        return _slurm.expand_hostlist(self._slurm_var("STEP_NODELIST"))

    def _resolve_task_configuration(self) -> dict[str, int]:
        hosts = self._resolve_hostlist()
        tasks = _slurm.expand_tasks_per_node(self._slurm_var("STEP_TASKS_PER_NODE"))
        return dict(zip(hosts, tasks))

    def num_accelerators(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        return {"GPU": 0} if self._cpu_only else super().num_accelerators()


def slurm_cluster_resolver(
    port_base: int = 8888,
    *,
    gpus_per_node: int | None = None,
    gpus_per_task: int | None = None,
    auto_set_gpu: bool = True,
    env: Mapping[str, str] | None = None,
) -> tf.distribute.cluster_resolver.SlurmClusterResolver:
    """A ``SlurmClusterResolver`` for the current Slurm job step.

    Reads ``SLURM_PROCID`` (this task's rank), ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``
    (a hostlist such as ``node[1-2]``) and ``SLURM_STEP_TASKS_PER_NODE`` (such as ``2(x2)``),
    falling back to ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST`` and ``SLURM_TASKS_PER_NODE``. Tasks
    are placed on the nodes in sorted host-name order, ports ``port_base, port_base + 1, ...``
    on each node, so ranks must be distributed in blocks (``srun --distribution=block``).

    Args:
      port_base: first port on each node.
      gpus_per_node: default from CUDA_VISIBLE_DEVICES or ``nvidia-smi`` (0 on CPU nodes).
      gpus_per_task: default ``gpus_per_node // tasks on the node``.
      auto_set_gpu: let ``cluster_spec()`` set CUDA_VISIBLE_DEVICES for this task (before
        TensorFlow starts CUDA).
      env: the environment to read; default ``os.environ``.

    Returns:
      The resolver, for ``make_strategy("multi_worker", cluster_resolver=...)``.

    Raises:
      ValueError: a bad ``port_base`` or a missing Slurm variable.
    """
    kwargs = {"port_base": port_base, "gpus_per_task": gpus_per_task, "auto_set_gpu": auto_set_gpu}
    return _SlurmResolver(os.environ if env is None else env, gpus_per_node, **kwargs)


def tf_config_from_slurm(port_base: int = 8888, env: Mapping[str, str] | None = None) -> dict:
    """The TF_CONFIG dict of this Slurm task (reads ``env``, default ``os.environ``).

    Workers are placed as by :func:`slurm_cluster_resolver`, one address per task whatever the
    GPUs (TF_CONFIG assigns no GPUs); the task index is the rank.

    Example:
      >>> env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
      ...        "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
      >>> tf_config_from_slurm(2222, env)["cluster"]["worker"]
      ['n1:2222', 'n1:2223', 'n2:2222', 'n2:2223']
    """
    resolver = _SlurmResolver(os.environ if env is None else env, 0, port_base=port_base)
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.get_task_info()
    return validate_tf_config({"cluster": cluster, "task": {"type": task_type, "index": task_id}})
