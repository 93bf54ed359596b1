"""cluster/ and k8s/: the lab's cluster description stays consistent, and jobs submitted with
``ray job submit`` to a real local head reach SUCCEEDED."""

from __future__ import annotations

import json
import os
import re
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


def test_lab_yaml_is_generated_from_nodes_yaml():
    from cluster.lab import render_lab

    assert (REPO / "cluster" / "lab.yaml").read_text() == render_lab(), "run python -m cluster.lab"
    check = subprocess.run([sys.executable, "-m", "cluster.lab", "--check"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_another_labs_nodes_file_fills_every_node_specific_field(tmp_path):
    import jsonschema
    import ray

    from cluster.lab import render_lab

    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({
        "cluster_name": "other-lab", "head": "10.1.0.5", "ssh": {"user": "ops", "private_key": "~/.ssh/lab"},
        "nodes": {"gpu1.other": {"gpu_type": "a30", "num_gpus": 2}, "10.1.0.5": {"gpu_type": None, "num_gpus": 0},
                  "gpu2.other": {"gpu_type": "titan_rtx", "num_gpus": 1}},
    }))
    config = yaml.safe_load(render_lab(nodes))
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["cluster_name"] == "other-lab"
    assert config["provider"] == {"type": "local", "head_ip": "10.1.0.5", "worker_ips": ["gpu1.other", "gpu2.other"]}
    assert config["auth"] == {"ssh_user": "ops", "ssh_private_key": "~/.ssh/lab"}
    assert config["max_workers"] == 2
    text = render_lab(nodes)
    assert "head.lab.internal" not in text and "titan-workstation" not in text  # nothing of our lab is left
    nodes.write_text(nodes.read_text().replace("head: 10.1.0.5", "head: missing.other"))
    with pytest.raises(ValueError, match="head 'missing.other' is not one of the nodes"):
        render_lab(nodes)


def _start_commands() -> list[str]:
    config = yaml.safe_load((REPO / "cluster" / "lab.yaml").read_text())
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def test_start_commands_stop_when_node_args_fails():
    commands = _start_commands()
    assert len(commands) == 2
    for command in commands:
        # the arguments are computed first, guarded, and only then handed to `ray start`
        assert "args=$(~/vlmlab/.venv/bin/python ~/vlmlab/cluster/node_args.py) || exit 1;" in command
        assert command.index("|| exit 1") < command.index("ray start")
        assert command.rstrip('"').endswith("$args")


def _fake_node(home: Path, nodes: dict) -> None:
    """A node's ~/vlmlab as the launcher lays it out, with a ``ray`` that records its arguments."""
    (home / "vlmlab" / "cluster").mkdir(parents=True)
    (home / "vlmlab" / ".venv" / "bin").mkdir(parents=True)
    (home / "vlmlab" / "cluster" / "node_args.py").write_text((REPO / "cluster" / "node_args.py").read_text())
    (home / "vlmlab" / "cluster" / "nodes.yaml").write_text(yaml.safe_dump({"head": None, "nodes": nodes}))
    for name, script in {
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
        "ray": '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$HOME/ray-args"\n',
    }.items():
        path = home / "vlmlab" / ".venv" / "bin" / name
        path.write_text(script)
        path.chmod(0o755)


@pytest.mark.parametrize("role", ["head", "worker"])
def test_start_command_passes_this_nodes_gpu_type_to_ray_start(tmp_path, role):
    import socket

    _fake_node(tmp_path, {socket.gethostname(): {"gpu_type": "a30", "num_gpus": 4}})
    (command,) = [c for c in _start_commands() if ("--head" in c) == (role == "head")]
    env = {**os.environ, "HOME": str(tmp_path), "RAY_HEAD_IP": "127.0.0.1"}
    run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "ray-args").read_text().splitlines()
    assert args[0] == "start"
    # each argument arrives whole: the resources JSON (with its space) is one argument
    assert args[-3:] == ["--num-gpus=4", '--resources={"a30": 4}', "--labels=vlmlab.io/gpu-type=a30"]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_start_command_fails_loudly_on_a_node_missing_from_nodes_yaml(tmp_path, role):
    _fake_node(tmp_path, {"some-other-machine.lab.internal": {"gpu_type": "a30", "num_gpus": 4}})
    (command,) = [c for c in _start_commands() if ("--head" in c) == (role == "head")]
    env = {**os.environ, "HOME": str(tmp_path), "RAY_HEAD_IP": "127.0.0.1"}
    run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "is not listed in" in run.stderr and "cluster/nodes.yaml" in run.stderr
    assert not (tmp_path / "ray-args").exists(), "ray start ran without the node's GPU type"


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


def test_node_args_exits_nonzero_naming_an_unknown_host():
    run = subprocess.run([sys.executable, "cluster/node_args.py", "--host", "gpu9.lab.internal"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert "unknown host 'gpu9.lab.internal'" in run.stderr
    assert "head.lab.internal" in run.stderr  # the hosts it knows
    assert "cluster/nodes.yaml" in run.stderr and "python -m cluster.lab" in run.stderr  # what to do


def test_node_args_exits_nonzero_on_a_machine_not_in_the_nodes_file(tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"nodes": {"elsewhere.lab.internal": {"gpu_type": None, "num_gpus": 0}}}))
    run = subprocess.run([sys.executable, "cluster/node_args.py", "--nodes", str(nodes)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert f"is not listed in {nodes}" in run.stderr and "cluster/nodes.yaml" in run.stderr


def test_node_args_rejects_a_gpu_type_without_gpus(tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"nodes": {"gpu1": {"gpu_type": "a30", "num_gpus": 0}}}))
    run = subprocess.run([sys.executable, "cluster/node_args.py", "--nodes", str(nodes), "--host", "gpu1"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "nodes.gpu1 has gpu_type 'a30' but num_gpus 0" in run.stderr


def test_job_runtime_environments_ship_code_only():
    # packages come with the nodes (cluster/lab.yaml setup) or the image: no job installs any
    installers = {"pip", "uv", "conda", "container", "image_uri"}
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "." and not installers & set(runtime_env)
    for name in ("rayjob-extract.yaml", "rayjob-tune.yaml"):
        (job,) = k8s(name)
        assert not installers & set(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    setup = " ".join(yaml.safe_load((REPO / "cluster" / "lab.yaml").read_text())["setup_commands"])
    assert "'.[diffusion]'" in setup  # what runtime_env.yaml used to install per job is on the nodes


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


def test_rayservice_serves_the_serve_config_with_the_values_merged():
    from cluster.rayservice import load_values, render_rayservice

    assert (REPO / "k8s" / "rayservice.yaml").read_text() == render_rayservice(), "run python -m cluster.rayservice"
    (service,) = k8s("rayservice.yaml")
    assert service["kind"] == "RayService"
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    values = load_values()
    # the app args a deployment must set are in the values file, and nothing but them differs
    assert {"store"} <= set(values["search"]) and {"detector", "classifier"} <= set(values["inspect"])
    assert {"model", "adapter"} <= set(values["vlm"])
    expected = [{**app, "args": {**app["args"], **values.get(app["name"], {})}} for app in shipped["applications"]]
    assert served["applications"] == expected
    (search,) = [a for a in served["applications"] if a["name"] == "search"]
    assert search["args"]["store"] == values["search"]["store"] and values["search"]["store"].startswith("/data/")
    # the Serve config's comments survive the merge, on the very lines the values went into
    assert f'store: "{values["search"]["store"]}"  # embedding store with index/' in service["spec"]["serveConfigV2"]
    # loopback on one machine; in the pods the proxies listen where the cluster's service reaches them
    assert shipped["http_options"]["host"] == "127.0.0.1" and served["http_options"]["host"] == "0.0.0.0"
    (cluster,) = k8s("raycluster.yaml")
    assert _worker_groups(service["spec"]["rayClusterConfig"]) == _worker_groups(cluster["spec"])


def test_rayservice_values_must_name_real_apps_and_args():
    from cluster.rayservice import SERVE_CONFIG, merge_app_args

    config = SERVE_CONFIG.read_text()
    with pytest.raises(ValueError, match="no application 'serach'"):
        merge_app_args(config, {"serach": {"store": "/data/s"}})
    with pytest.raises(ValueError, match="search has no arg stroe"):
        merge_app_args(config, {"search": {"stroe": "/data/s"}})
    # deployments (whose items are `- name:` lines too) before args: the values still reach the app
    swapped = "applications:\n  - name: search\n    deployments:\n      - name: QueryEncoder\n" \
              "    args:\n      store: \"\"  # the store\n"
    assert 'store: "/data/s"  # the store' in merge_app_args(swapped, {"search": {"store": "/data/s"}})
    merged = yaml.safe_load(merge_app_args(config, {"inspect": {"conf": 0.5, "conformal": 0.1}}))
    (inspect,) = [a for a in merged["applications"] if a["name"] == "inspect"]
    assert inspect["args"]["conf"] == 0.5 and inspect["args"]["conformal"] == 0.1


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


MANIFESTS = ["raycluster.yaml", "rayservice.yaml", "rayjob-extract.yaml", "rayjob-tune.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
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


def test_storage_defines_the_shared_read_write_many_claim():
    import kubernetes_validate

    (claim,) = k8s("storage.yaml")
    kubernetes_validate.validate(claim, kubernetes_validate.latest_version(), strict=True)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "vlmlab-data"
    # the head and the workers of several nodes read and write it at once
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]


def makefile_image() -> str:
    """The image ``make image`` builds by default (IMAGE unset in the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGE"}
    out = subprocess.run(["make", "-n", "image"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    (command,) = [line for line in out.stdout.splitlines() if line.startswith("docker build")]
    return command.split()[command.split().index("-t") + 1]


def test_every_pod_runs_the_makefile_image_and_ray_pods_mount_the_claim():
    import tomllib

    image = makefile_image()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.endswith(f"/vlmlab:{version}")  # the registry is the lab's; the tag is this release
    (claim,) = k8s("storage.yaml")
    for name in MANIFESTS:
        for doc in k8s(name):
            for group, template in _pod_templates(doc):
                spec = template["spec"]
                for container in spec["containers"]:
                    assert container["image"] == image, f"{name} {group}: {container['image']} is not {image}"
                if group == "submitter":
                    continue  # it only packs the image's working_dir and submits: no data
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/data"]
                claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
                assert claim_name == claim["metadata"]["name"], f"{name} {group} mounts {claim_name}"


def _dockerfile() -> tuple[str, dict[str, str], str]:
    """The Dockerfile's base image, ARG defaults and WORKDIR."""
    text = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    (workdir,) = re.findall(r"^WORKDIR (\S+)", text, re.M)
    return base, dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M)), workdir


def test_dockerfile_agrees_with_the_pins_and_the_jobs():
    import tomllib

    import ray

    base, args, workdir = _dockerfile()
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"  # the Ray of the pin and of k8s rayVersion
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in dependencies
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in dependencies
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    for name in ("rayjob-extract.yaml", "rayjob-tune.yaml"):
        (job,) = k8s(name)
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache"} <= set(ignored)


def _resolve(*extra: str) -> subprocess.CompletedProcess:
    """``pip install --dry-run`` of what the Dockerfile installs (this project with its EXTRAS), from
    scratch: the resolver reads package metadata (PEP 658) or local wheels, it downloads no torch."""
    _, args, _ = _dockerfile()
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", "-", f".[{args['EXTRAS']}]", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_images_dependency_set_resolves():
    import tomllib

    run = _resolve()
    assert run.returncode == 0, run.stderr[-3000:]
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(run.stdout)["install"]}
    _, args, _ = _dockerfile()
    assert installed["torch"] == args["TORCH_VERSION"] and installed["torchvision"] == args["TORCHVISION_VERSION"]
    assert installed["ray"].startswith("2.60.")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"][args["EXTRAS"]]
    names = {re.match(r"[A-Za-z0-9_.-]+", d)[0].lower().replace("_", "-") for d in wanted}
    assert names <= set(installed), names - set(installed)


@pytest.mark.slow
def test_the_resolution_fails_on_a_conflicting_pin():
    # the check above can fail: a requirement that contradicts a pin (pyproject's torch==2.14.1) is reported
    run = _resolve("torch==2.13.0")
    assert run.returncode != 0 and "ResolutionImpossible" in run.stderr
