"""What a run reserves on a cluster (issue 17.4): CPUs = its threads, a GPU share by input
size, memory from the preflight's own estimate; and the per-run CPU/device setting that
experiments and the search pass through core.runs.jobs. No Ray needed."""

from __future__ import annotations

from dataclasses import replace

from core.process import CPU_RESERVATION_ENV, physical_cores
from core.runs import jobs
from core.runs.executors.ray import JobRequest, NodeResources, job_request, unmet_request
from core.runs.preflight import memory_estimate, preflight, run_memory_estimate
from tests.conftest import tiny_config

GB = 1024**3


def test_a_job_asks_for_its_threads_a_gpu_share_by_size_and_the_preflights_memory(
        tiny_folder, store):
    cfg = tiny_config(tiny_folder)  # 32 px, 1 thread, cpu
    memory = preflight(cfg, store).memory_bytes
    assert memory == run_memory_estimate(cfg) > GB  # one estimate, at submit and dispatch
    assert job_request(cfg, memory, cluster_has_gpu=True) == JobRequest(1.0, 0.0, memory)
    assert job_request(replace(cfg, threads=0), 1, False).cpus == 1  # auto: one CPU
    assert job_request(replace(cfg, threads=3, device="cuda"), 1, False) == JobRequest(3, .25, 1)
    assert job_request(replace(cfg, resolution=96, device="cuda"), 1, False).gpus == 0.5
    assert job_request(replace(cfg, resolution=224, device="cuda"), 1, False).gpus == 1.0
    # auto takes a GPU share only where the cluster has GPUs (else Ray would never place it)
    assert job_request(replace(cfg, device="auto"), 1, cluster_has_gpu=True).gpus == 0.25
    assert job_request(replace(cfg, device="auto"), 1, cluster_has_gpu=False).gpus == 0
    # More images held in memory, more memory asked for.
    assert memory_estimate(cfg, 10_000, True) > memory_estimate(cfg, 100, True)


def test_a_request_no_node_can_satisfy_names_the_clusters_resources():
    nodes = [NodeResources("10.0.0.5", 8, 0, 30 * GB), NodeResources("10.0.0.6", 2, 0, 4 * GB)]
    message = unmet_request(JobRequest(1, 1.0, GB), nodes, "http://head:8265")
    assert message.startswith("no node of the Ray cluster at http://head:8265 can run this: it "
                              "asks for 1 CPU, 1 GPU, 1.0 GB memory, and the cluster has "
                              "10.0.0.5: 8 CPU, no GPU, 30.0 GB memory; 10.0.0.6: 2 CPU, no "
                              "GPU, 4.0 GB memory.")
    assert "Pick device auto or cpu" in message
    assert unmet_request(JobRequest(4, 0, 8 * GB), nodes, "u") is None  # the first fits
    assert "Lower the threads" in unmet_request(JobRequest(16, 0, GB), nodes, "u")


def test_the_worker_uses_no_more_threads_than_its_reservation(monkeypatch):
    monkeypatch.setenv(CPU_RESERVATION_ENV, "1")
    assert physical_cores() == 1
    monkeypatch.delenv(CPU_RESERVATION_ENV)
    assert physical_cores() >= 1


def test_experiments_and_search_set_cpus_and_device_per_run(store, tiny_folder):
    resources = jobs.RunResources(threads=2, device="cpu")
    run = jobs.submit(store, tiny_config(tiny_folder, threads=0, device="auto"), start=False,
                      resources=resources)
    assert (run.config.threads, run.config.device) == (2, "cpu")
    assert job_request(run.config, 1, True).cpus == 2  # what the Ray job then reserves
