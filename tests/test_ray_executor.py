"""Sweeps and plans on a local Ray instance (2 CPUs) give exactly the rows of the local runs.

Ray is in the ``test`` extra, so CI runs this; ``--executor ray`` without Ray, or with an address nothing
answers at, is a one-line error."""

from __future__ import annotations

import copy
import socket
import sys

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.plan import run_plan
from sim.sweep import run_sweep

from test_plan import PLAN
from test_sweep_report import SWEEP

ray = pytest.importorskip("ray")


def test_an_unreachable_address_is_one_line(tmp_path, capsys):
    assert not ray.is_initialized()  # these run before the module's Ray instance starts (file order)
    with socket.socket() as s:  # a port nothing listens on: bind, read the number, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    code = main(["sweep", str(path), "--no-progress", "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"moesim: error: --address 127.0.0.1:{port}: no Ray cluster reachable at 127.0.0.1:{port} (")
    assert err.count("\n") == 1


def test_ray_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    code = main(["sweep", str(path), "--no-progress", "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert (code, capsys.readouterr().err) == (
        2, "moesim: error: --executor ray: Ray is not installed; install it with: pip install 'moesim[ray]'\n")
    assert not (tmp_path / "o" / "points").exists() or not any((tmp_path / "o" / "points").iterdir())


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_sweep_on_ray_matches_the_local_pool(tmp_path, local_ray):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))  # 4 points, 12 requests each
    local = run_sweep(path, tmp_path / "local", jobs=1, progress=False)
    on_ray = run_sweep(path, tmp_path / "ray", progress=False, executor="ray")
    pd.testing.assert_frame_equal(on_ray, local)
    # The driver wrote every point's run folder from what the Ray workers returned, byte for byte the same.
    for key in local["key"]:
        for name in ("summary.json", "requests.csv", "iterations.csv"):
            assert (tmp_path / "ray" / "points" / key / name).read_bytes() == (tmp_path / "local" / "points" / key / name).read_bytes()


def test_plan_on_ray_matches_in_process(tmp_path, local_ray):
    data = copy.deepcopy(PLAN)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    local, _ = run_plan(path, jobs=1, progress=False)
    on_ray, results = run_plan(path, progress=False, executor="ray")
    pd.testing.assert_frame_equal(on_ray, local)
    assert [r.status for r in results] == ["meets target", "meets target", "pruned", "pruned"]
