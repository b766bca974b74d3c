"""What still works under the limits of tests/test_hostile_config.py: anchors and merges within the YAML limits,
the network flags (``--cluster`` reaching a real scheduler, ``--listen`` binding the local cluster), command-line
choices replacing a config's, ``equi resume`` not reusing recorded network settings, types that stay accepted."""

from __future__ import annotations

import pytest
import yaml
from distributed import LocalCluster

from flows.execution import make_task_runner
from flows.run_options import apply_overrides, exposure_warning
from flows.scheduler_check import check_scheduler
from tasks.config import ConfigError, load_config, parse_config
from tasks.config_checks import check_scheduler_address, is_loopback, without_network
from tasks.config_yaml import MAX_DEPTH, parse_yaml
from tests.pipeline_helpers import tiny_config


def test_anchors_merges_and_dates_within_the_limits() -> None:
    text = "base: &b {eps: 8, steps: 2}\nuse: {<<: *b, steps: 3}\nlist: [*b, *b]\nday: 2024-01-01\n'on': 1\n"
    data = parse_yaml(text, "x.yaml")
    assert data["use"] == {"eps": 8, "steps": 3} and data["list"] == [data["base"]] * 2
    assert data["day"] == "2024-01-01" and data["on"] == 1  # a date stays a string; a quoted key is a string
    nested = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # under the top-level mapping
    assert parse_yaml(nested, "x.yaml")["a"] is not None  # exactly at the limit


def test_a_config_file_with_anchors_loads_like_the_plain_one(tmp_path) -> None:
    cfg = tiny_config(tmp_path, cluster={"in_process": True})
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("defenses", "measure")})
    text += "defenses:\n- {name: vanilla}\n- {name: equivariance, steps: 2, views: [&h hflip, &r {name: resize, "
    text += "scale: [0.75, 1.25]}]}\nmeasure: {views: [*h]}\n"
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(text)
    assert load_config(anchored).run_id() == load_config(plain).run_id()


def test_numbers_that_stay_accepted(tmp_path) -> None:
    cfg = tiny_config(tmp_path, cluster={"in_process": True}, reference_eps=4, retry_delay_s=[0, 1.5])
    cfg["attacks"][1]["eps"] = 48.0  # an int for a float, a float for a float
    parsed = parse_config(cfg)
    assert parsed.reference_eps == 4.0 and parsed.retry_delay_s == [0.0, 1.5]


def test_a_real_scheduler_answers_and_a_worker_is_not_one() -> None:
    with LocalCluster(
        n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        check_scheduler(cluster.scheduler_address, 5)
        worker = next(iter(cluster.scheduler_info["workers"]))
        with pytest.raises(ConfigError, match="a Dask Worker answered, not a scheduler"):
            check_scheduler(worker, 5)


def test_command_line_flags_choose_the_network_and_replace_the_configs_way_to_run(tmp_path) -> None:
    cfg = parse_config(tiny_config(tmp_path))  # n_workers: 2
    remote = apply_overrides(cfg, cluster="10.1.2.3:8786")
    assert remote.cluster.address == "tcp://10.1.2.3:8786" and remote.cluster.n_workers is None
    assert make_task_runner(remote).client_kwargs["timeout"] == "10.0s"
    assert apply_overrides(cfg, in_process=True).cluster.in_process  # --in-process over n_workers
    exposed = apply_overrides(cfg, listen="0.0.0.0", workers=3)
    kw = make_task_runner(exposed).cluster_kwargs
    assert kw["host"] == "0.0.0.0" and kw["n_workers"] == 3
    assert "can run code as you" in exposure_warning(exposed)
    assert exposure_warning(cfg) is None and exposure_warning(apply_overrides(cfg, listen="localhost")) is None
    with pytest.raises(ConfigError, match="--in-process and --workers conflict"):
        apply_overrides(cfg, in_process=True, workers=2)


def test_resume_does_not_reuse_recorded_network_settings(tmp_path) -> None:
    cfg = apply_overrides(parse_config(tiny_config(tmp_path)), cluster="tls://10.1.2.3:8786")
    recorded = cfg.model_dump(mode="json")
    again = parse_config(without_network({**recorded, "cluster": {**recorded["cluster"], "host": "0.0.0.0"}}))
    assert again.cluster.address is None and again.cluster.host == "127.0.0.1"
    assert again.run_id() == cfg.run_id()
    # Recorded before in_process and n_workers conflicted (`--in-process` over a config's n_workers): in process.
    old = {**recorded, "cluster": {**recorded["cluster"], "address": None, "in_process": True, "n_workers": 2}}
    assert parse_config(without_network(old)).cluster.in_process


@pytest.mark.parametrize(
    ("address", "ok"),
    [("tcp://h:8786", True), ("h.example.org:1", True), ("tls://[::1]:8786", True), ("tcp://h:0", False),
     ("tcp://h", False), ("ssh://h:22", False), ("tcp://h:8786/x", False)],
)  # fmt: skip
def test_scheduler_addresses(address: str, ok: bool) -> None:
    if ok:
        assert check_scheduler_address(address).startswith(("tcp://", "tls://"))
    else:
        with pytest.raises(ConfigError, match="is not a Dask scheduler address"):
            check_scheduler_address(address)


def test_loopback_hosts_may_come_from_a_config_file(tmp_path) -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org"]))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, cluster={"host": "localhost"})))
    assert load_config(path).cluster.host == "localhost"
