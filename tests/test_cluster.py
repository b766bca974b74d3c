"""Where runs execute: local cluster sizing, GPU resources, existing schedulers, localhost binding."""

from __future__ import annotations

import torch

from flows.execution import make_task_runner
from flows.startup import default_workers
from tasks.config import parse_config
from tests.pipeline_helpers import tiny_config


def test_local_cluster_binds_to_localhost_one_single_threaded_worker_per_core(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cfg = parse_config(tiny_config(tmp_path, cluster={}))
    assert default_workers(cfg) == (4, 0)
    kw = make_task_runner(cfg).cluster_kwargs
    assert kw["host"] == "127.0.0.1" and kw["dashboard_address"] is None
    assert kw["n_workers"] == 4 and kw["threads_per_worker"] == 1 and "resources" not in kw


def test_one_worker_per_gpu_with_a_gpu_resource(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = parse_config(tiny_config(tmp_path, cluster={}))
    assert default_workers(cfg) == (2, 2)
    kw = make_task_runner(cfg).cluster_kwargs
    assert kw["n_workers"] == 2 and kw["resources"] == {"GPU": 1}
    # A CPU-only config ignores the GPUs.
    cpu = parse_config(tiny_config(tmp_path, device="cpu", cluster={}))
    assert default_workers(cpu)[1] == 0


def test_existing_scheduler_by_address_and_opt_in_dashboard(tmp_path):
    runner = make_task_runner(parse_config(tiny_config(tmp_path, cluster={"address": "tcp://10.1.2.3:8786"})))
    assert runner.address == "tcp://10.1.2.3:8786"
    kw = make_task_runner(parse_config(tiny_config(tmp_path, cluster={"dashboard": True}))).cluster_kwargs
    assert kw["dashboard_address"] == "127.0.0.1:8787"
