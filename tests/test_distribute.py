"""Strategies by name, logical CPU devices, TF_CONFIG build/validate, Slurm placement.

Runs in-process on the 4 logical CPU devices configured by conftest.py. MultiWorkerMirroredStrategy
itself is exercised in test_launch.py (it needs several processes).
"""

import json
import os
import types

import pytest
import tensorflow as tf

from tf_largebatch.distribute import (
    ALL_REDUCE,
    STRATEGIES,
    build_tf_config,
    configure_cpu_devices,
    is_chief,
    make_strategy,
    slurm_cluster_resolver,
    tf_config_from_slurm,
    tf_config_json,
    validate_tf_config,
    worker_info,
)

WORKERS = ["127.0.0.1:2222", "127.0.0.1:2223"]


@pytest.fixture(autouse=True)
def _no_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)


def _replica_sum(strategy):
    """Σ over replicas of (replica id + 1), as seen by every replica after an all-reduce."""

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("sum", tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0)

        return strategy.run(replica_fn)

    return [float(t) for t in strategy.experimental_local_results(step())]


# --- TF_CONFIG ---------------------------------------------------------------------------------


def test_build_tf_config_exact_and_round_trip():
    config = build_tf_config(WORKERS, 1)
    assert config == {"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": 1}}
    assert validate_tf_config(tf_config_json(WORKERS, 1)) == config
    assert json.loads(tf_config_json(WORKERS, 1)) == config


def test_build_tf_config_with_chief():
    config = build_tf_config(WORKERS, 0, task_type="chief", chief="10.0.0.1:2000")
    assert config == {
        "cluster": {"chief": ["10.0.0.1:2000"], "worker": WORKERS},
        "task": {"type": "chief", "index": 0},
    }
    worker = build_tf_config(WORKERS, 1, chief="10.0.0.1:2000")
    assert worker["task"] == {"type": "worker", "index": 1}
    assert validate_tf_config(json.dumps(worker)) == worker


def test_validate_tf_config_reads_environment(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config_json(WORKERS, 0))
    assert validate_tf_config()["task"] == {"type": "worker", "index": 0}


def test_validate_tf_config_allows_evaluator_outside_cluster():
    value = {"cluster": {"worker": WORKERS}, "task": {"type": "evaluator", "index": 0}}
    assert validate_tf_config(value) == value


_GOOD_TASK = {"type": "worker", "index": 0}


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "empty or not set"),
        ("  ", "empty or not set"),
        ('{"cluster": {"worker": ["a:1"]}, "task": ', "malformed JSON"),
        ("[1, 2]", 'missing "cluster"'),
        (5, "expected a JSON string or a dict"),
        ({"task": _GOOD_TASK}, 'missing "cluster"'),
        ({"cluster": {}, "task": _GOOD_TASK}, 'missing "cluster"'),
        ({"cluster": {"worker": WORKERS}}, 'missing "task"'),
        ({"cluster": {"worker": "a:1"}, "task": _GOOD_TASK}, 'cluster["worker"] must be'),
        ({"cluster": {"worker": []}, "task": _GOOD_TASK}, 'cluster["worker"] must be'),
        ({"cluster": {"worker": ["localhost"]}, "task": _GOOD_TASK}, "'localhost'"),
        ({"cluster": {"worker": [":2222"]}, "task": _GOOD_TASK}, "':2222'"),
        ({"cluster": {"worker": ["h:99999"]}, "task": _GOOD_TASK}, "'h:99999'"),
        ({"cluster": {"worker": ["h:port"]}, "task": _GOOD_TASK}, "'h:port'"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "ps", "index": 0}}, "'ps' is not in"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "worker"}}, "index None"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": 2}}, "index 2 is"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": -1}}, "index -1"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": "1"}}, "index '1'"),
        ({"cluster": {"worker": WORKERS}, "task": {"type": "worker", "index": True}}, "True"),
    ],
)
def test_validate_tf_config_errors(value, reason):
    with pytest.raises(ValueError) as info:
        validate_tf_config(value)
    message = str(info.value)
    assert message.startswith("Invalid TF_CONFIG: ")
    assert reason in message
    assert "Received: TF_CONFIG=" in message
    assert "\n" not in message


def test_validate_tf_config_unset_environment():
    with pytest.raises(ValueError, match="Invalid TF_CONFIG: empty or not set"):
        validate_tf_config()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"workers": []}, "workers"),
        ({"workers": "127.0.0.1:2222"}, "workers"),
        ({"workers": ["127.0.0.1"]}, "workers"),
        ({"task_index": 2}, "task_index"),
        ({"task_index": -1}, "task_index"),
        ({"task_index": True}, "task_index"),
        ({"task_index": "0"}, "task_index"),
        ({"task_type": "ps"}, "task_type"),
        ({"chief": "nowhere"}, "chief"),
        ({"task_type": "chief", "task_index": 0}, "chief"),
        ({"task_type": "chief", "task_index": 1, "chief": "h:1"}, "task_index"),
    ],
)
def test_build_tf_config_errors(kwargs, name):
    args = {"workers": WORKERS, "task_index": 0, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        build_tf_config(**args)


# --- Strategies -------------------------------------------------------------------------------


def test_constants():
    assert STRATEGIES == ("auto", "one_device", "mirrored", "multi_worker")
    assert ALL_REDUCE == ("auto", "ring", "nccl")


def test_mirrored_uses_all_logical_cpus():
    strategy = make_strategy("mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 4
    assert [d.split("/")[-1] for d in strategy.extended.worker_devices] == [
        f"device:CPU:{i}" for i in range(4)
    ]
    assert _replica_sum(strategy) == [10.0] * 4  # 1 + 2 + 3 + 4


def test_mirrored_device_subset_and_ring():
    strategy = make_strategy("mirrored", devices=["/cpu:1", "/cpu:3"], all_reduce="ring")
    assert strategy.num_replicas_in_sync == 2
    assert [d[-5:] for d in strategy.extended.worker_devices] == ["CPU:1", "CPU:3"]
    assert isinstance(strategy.extended._cross_device_ops, tf.distribute.HierarchicalCopyAllReduce)
    assert _replica_sum(strategy) == [3.0, 3.0]


def test_mirrored_with_num_cpu_devices_already_configured():
    assert make_strategy("mirrored", num_cpu_devices=4).num_replicas_in_sync == 4


def test_one_device():
    strategy = make_strategy("one_device")
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended.worker_devices[0].endswith("CPU:0")
    other = make_strategy("one_device", devices=["/cpu:2"])
    assert other.extended.worker_devices[0].endswith("CPU:2")
    assert _replica_sum(other) == [1.0]


def test_auto(monkeypatch):
    assert isinstance(make_strategy(), tf.distribute.MirroredStrategy)  # 4 logical CPUs
    assert make_strategy().num_replicas_in_sync == 4
    assert isinstance(make_strategy(devices=["/cpu:2"]), tf.distribute.OneDeviceStrategy)
    monkeypatch.setenv("TF_CONFIG", tf_config_json(WORKERS[:1], 0))  # one worker: stay local
    assert isinstance(make_strategy(), tf.distribute.MirroredStrategy)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": ')
    with pytest.raises(ValueError, match="Invalid TF_CONFIG: malformed JSON"):
        make_strategy()


def test_multi_worker_validates_tf_config_first():
    with pytest.raises(ValueError, match="Invalid TF_CONFIG: empty or not set"):
        make_strategy("multi_worker")


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        (("horovod",), {}, "name"),
        (("mirrored",), {"all_reduce": "tree"}, "all_reduce"),
        (("mirrored",), {"all_reduce": "nccl"}, "all_reduce"),  # no GPUs
        (("mirrored",), {"devices": []}, "devices"),
        (("mirrored",), {"devices": "/cpu:0"}, "devices"),
        (("one_device",), {"devices": ["/cpu:0", "/cpu:1"]}, "devices"),
        (("multi_worker",), {"devices": ["/cpu:0"]}, "devices"),
        (("mirrored",), {"num_cpu_devices": 0}, "num_cpu_devices"),
    ],
)
def test_make_strategy_errors(args, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        make_strategy(*args, **kwargs)


def test_configure_cpu_devices_after_initialisation():
    assert len(tf.config.list_logical_devices("CPU")) == 4  # initialises the runtime
    configure_cpu_devices(4)  # same count: no-op
    with pytest.raises(RuntimeError, match="num_cpu_devices=2.*already initialised with 4"):
        configure_cpu_devices(2)
    assert len(tf.config.list_logical_devices("CPU")) == 4


@pytest.mark.parametrize("value", [0, -1, 2.0, True, None])
def test_configure_cpu_devices_rejects(value):
    with pytest.raises(ValueError, match="`num_cpu_devices`.*Received: num_cpu_devices="):
        configure_cpu_devices(value)


# --- Chief ------------------------------------------------------------------------------------


def test_single_process_strategies_are_chief():
    for strategy in (make_strategy("one_device"), make_strategy("mirrored")):
        assert worker_info(strategy) == ("worker", 0)
        assert is_chief(strategy)


@pytest.mark.parametrize(
    "chief, task_type, task_id, expected",
    [
        (None, "worker", 0, True),
        (None, "worker", 1, False),
        ("h:1", "chief", 0, True),
        ("h:1", "worker", 0, False),
        ("h:1", "worker", 1, False),
    ],
)
def test_is_chief_in_a_cluster(chief, task_type, task_id, expected):
    cluster = build_tf_config(WORKERS, 0, chief=chief)["cluster"]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id
    )
    strategy = types.SimpleNamespace(cluster_resolver=resolver)  # what MWMS exposes
    assert worker_info(strategy) == (task_type, task_id)
    assert is_chief(strategy) is expected


# --- Slurm ------------------------------------------------------------------------------------

_STEP_ENV = {  # srun in a job of 2 nodes x 2 tasks
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
_JOB_ENV = {  # the same job seen from an sbatch script (no step variables)
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
}
_NODE_WORKERS = ["node1:2222", "node1:2223", "node2:2222", "node2:2223"]


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("env", [_STEP_ENV, _JOB_ENV])
def test_tf_config_from_slurm(rank, env):
    config = tf_config_from_slurm(2222, env={**env, "SLURM_PROCID": str(rank)})
    assert config == {
        "cluster": {"worker": _NODE_WORKERS},
        "task": {"type": "worker", "index": rank},
    }


def test_tf_config_from_slurm_uneven_nodes_and_padding():
    env = {
        "SLURM_PROCID": "2",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_STEP_NODELIST": "gpu7,n[01-02]",
        "SLURM_STEP_TASKS_PER_NODE": "1,1(x2)",
    }
    config = tf_config_from_slurm(8888, env=env)
    assert config["cluster"]["worker"] == ["gpu7:8888", "n01:8888", "n02:8888"]
    assert config["task"] == {"type": "worker", "index": 2}


def test_slurm_cluster_resolver_cpu_and_gpu_nodes():
    env = {**_STEP_ENV, "SLURM_PROCID": "1"}
    cpu = slurm_cluster_resolver(2222, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert cpu.cluster_spec().as_dict() == {"worker": _NODE_WORKERS}
    assert cpu.get_task_info() == ("worker", 1)
    assert cpu.num_accelerators() == {"GPU": 0}
    gpu = slurm_cluster_resolver(2222, gpus_per_node=4, auto_set_gpu=False, env=env)
    assert gpu.cluster_spec().as_dict() == {"worker": _NODE_WORKERS}
    assert gpu.num_accelerators() == {"GPU": 2}


def test_slurm_cluster_resolver_assigns_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unchanged")  # restored after the test
    env = {**_STEP_ENV, "SLURM_PROCID": "3", "CUDA_VISIBLE_DEVICES": "0,1"}  # 2 GPUs per node
    resolver = slurm_cluster_resolver(2222, env=env)
    assert resolver.cluster_spec().as_dict() == {"worker": _NODE_WORKERS}
    assert resolver.num_accelerators() == {"GPU": 1}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # second task on node2 gets its GPU 1


def test_slurm_errors():
    with pytest.raises(ValueError, match="SLURM_PROCID is not set"):
        tf_config_from_slurm(env=_STEP_ENV)
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST is not set"):
        tf_config_from_slurm(env={"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    for port_base in (0, 70000, True):
        with pytest.raises(ValueError, match="`port_base`.*Received: port_base="):
            tf_config_from_slurm(port_base, env={**_STEP_ENV, "SLURM_PROCID": "0"})
