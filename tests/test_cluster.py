"""cluster/ and k8s/: the lab's cluster description stays consistent, and jobs submitted with
``ray job submit`` to a real local head reach SUCCEEDED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.node_args import GPU_TYPE_LABEL, load_nodes, ray_start_args
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
GPU_TYPES = {"titan_rtx", "a30"}


def k8s(name: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / "k8s" / name).read_text()))


def test_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "lab.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "local"
    hosts = [config["provider"]["head_ip"], *config["provider"]["worker_ips"]]
    assert set(hosts) == set(load_nodes())
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "cluster/node_args.py" in command


def test_every_gpu_node_declares_its_type_as_resource_and_label():
    nodes = load_nodes()
    assert {n["gpu_type"] for n in nodes.values() if n["gpu_type"]} == GPU_TYPES
    for node in nodes.values():
        args = ray_start_args(node)
        assert f"--num-gpus={node['num_gpus']}" in args
        if node["gpu_type"]:
            assert f"--resources={json.dumps({node['gpu_type']: node['num_gpus']})}" in args
            assert f"--labels={GPU_TYPE_LABEL}={node['gpu_type']}" in args


def test_node_args_cli_prints_quoted_arguments():
    out = subprocess.run([sys.executable, "cluster/node_args.py", "--host", "a30-server.lab.internal"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "--num-gpus=4 '--resources={\"a30\": 4}' --labels=vlmlab.io/gpu-type=a30"


def test_profiles_cover_the_declared_gpu_types():
    profiles = yaml.safe_load((REPO / "cluster" / "profiles.yaml").read_text())
    names = set(profiles.get("profiles", profiles))
    assert GPU_TYPES <= names


def _worker_groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def test_raycluster_gpu_groups_match_the_on_prem_nodes():
    (cluster,) = k8s("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    import ray

    assert spec["rayVersion"] == ray.__version__
    declared = {}
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        resources = json.loads(json.loads(params["resources"]))
        (gpu_type, amount), = resources.items()
        declared[gpu_type] = amount
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == params["num-gpus"] == str(amount)
        assert "nvidia.com/gpu.product" in group["template"]["spec"]["nodeSelector"]
        assert params["labels"] == f"{GPU_TYPE_LABEL}={gpu_type}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    on_prem = {n["gpu_type"]: n["num_gpus"] for n in load_nodes().values() if n["gpu_type"]}
    assert declared == on_prem


@pytest.mark.parametrize("name", ["rayjob-extract.yaml", "rayjob-tune.yaml"])
def test_rayjobs_target_the_cluster_and_run_our_modules(name):
    (job,) = k8s(name)
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "vlmlab"}
    entry = job["spec"]["entrypoint"]
    module = entry.split()[2]
    assert entry.startswith("python -m ")
    path = REPO / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]


def test_tune_rayjob_trains_its_trials_on_gpus():
    # the RayJob's command line fills the search config exactly as `python -m training.tune` does
    import argparse
    import shlex

    from training.tune import LoraSearchConfig
    from vlmlab.config import add_config_arguments, config_from_args

    (job,) = k8s("rayjob-tune.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])[3:]
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser, LoraSearchConfig)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = config_from_args(LoraSearchConfig, args, REPO / args.config, args.overrides)
    assert cfg.trial.use_gpu is True and cfg.trial.pairs.startswith("/data/") and cfg.name == "tune-lora"


def test_rayservice_serves_exactly_the_serve_config():
    from cluster.rayservice import render_rayservice

    assert (REPO / "k8s" / "rayservice.yaml").read_text() == render_rayservice(), "run python -m cluster.rayservice"
    (service,) = k8s("rayservice.yaml")
    assert service["kind"] == "RayService"
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    assert served["applications"] == shipped["applications"]
    # loopback on one machine; in the pods the proxies listen where the cluster's service reaches them
    assert shipped["http_options"]["host"] == "127.0.0.1" and served["http_options"]["host"] == "0.0.0.0"
    (cluster,) = k8s("raycluster.yaml")
    assert _worker_groups(service["spec"]["rayClusterConfig"]) == _worker_groups(cluster["spec"])


# --------------------------------------------------------------------------- a real local head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 in its own process group, stopped by killing that group
    (``ray stop`` would also stop every other Ray on the machine)."""
    temp = tmp_path_factory.mktemp("rayhead")
    dashboard = free_port()
    env = dict(os.environ)
    # jobs run `python -m ...`: the first python on PATH must be this environment's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # Ray 2.60 turns token auth on when a token file exists (a local ray.init writes one); the
    # head and the CLI would then need the same token. This throwaway head runs without it.
    env["RAY_AUTH_MODE"] = "disabled"
    log_path = temp / "head.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed after the head stops
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--num-cpus=2",
         # every agent on its own free port: the suite's local Ray already holds the default ones
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--object-store-memory={300 * 1024**2}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while time.time() < deadline:
        ok = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                            capture_output=True, text=True, env=env)
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"local Ray head did not come up in 180 s\nhead: {log_path.read_text()[-3000:]}\n"
                    f"ray job list: {ok.stdout[-1500:]}{ok.stderr[-1500:]}")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log_file.close()


def submit(address: str, env: dict, *entrypoint: str, timeout: int = 300) -> str:
    """``ray job submit --working-dir . -- ENTRYPOINT``; returns the job's output (asserts success)."""
    for _ in range(30):
        out = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
             "--working-dir", ".", "--", *entrypoint],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )
        # the dashboard answers before the head's job agent has registered; Ray says to retry
        if "No available agent to submit job" not in out.stderr + out.stdout:
            break
        time.sleep(2)
    assert out.returncode == 0 and "succeeded" in out.stdout.lower(), out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_extraction_job_submitted_to_a_local_head(ray_head, samples_dir, tiny_model, tmp_path):
    from vlmlab.store import EmbeddingStore

    address, env = ray_head
    store_dir = tmp_path / "store"
    submit(address, env, "python", "-m", "pipelines.extract", str(samples_dir / "tiles"),
           "--model", tiny_model, "--out", str(store_dir))
    store = EmbeddingStore.open(store_dir)
    table = store.read(columns=["path", "tile_z"])
    assert store.model == tiny_model
    assert len(table) == len(list((samples_dir / "tiles").rglob("*.png"))) == 256
    assert set(table["tile_z"].to_pylist()) == {17}


@pytest.mark.slow
def test_one_trial_tune_job_submitted_to_a_local_head(ray_head, relabelled_pairs, tiny_model, tmp_path):
    address, env = ray_head
    out = submit(address, env, "python", "-m", "training.tune", "--config", "training/configs/lora_search.yaml",
                 f"pairs={relabelled_pairs}", f"model={tiny_model}", f"run_dir={tmp_path}", "name=job",
                 "num_samples=1", "epochs=1", "grace_period=1", "steps_per_epoch=2", "batch_size=8",
                 "cpus_per_worker=0.5", timeout=600)
    assert (tmp_path / "job" / "best_adapter" / "adapter_model.safetensors").is_file(), out[-2000:]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    templates = []
    if "headGroupSpec" in spec:
        templates.append(("head", spec["headGroupSpec"]["template"]))
        templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        templates.append(("submitter", spec["submitterPodTemplate"]))
    return templates


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml", "rayjob-extract.yaml", "rayjob-tune.yaml"])
def test_pod_templates_are_valid_kubernetes_pods(name):
    """No package on the registries ships the KubeRay CRD schemas; the pod templates inside them
    are core Kubernetes objects, validated strictly against the Kubernetes OpenAPI schema."""
    import kubernetes_validate

    for doc in k8s(name):
        templates = _pod_templates(doc)
        assert templates, f"{name}: no pod template found"
        for group, template in templates:
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": group}, "spec": template["spec"]}
            kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
