"""The deployment files describe the same application as `coe serve`: Serve's own schema accepts
them, their args are valid coe configs, and their deployment names are the ones build_app makes."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from core.config import CoeConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def deployment_names(config: CoeConfig) -> set[str]:
    """The deployments build_app creates for this config's catalog (no Ray started)."""
    from ray.serve import Application

    from deploy.app import build_app

    names, stack = set(), [build_app(config)]
    while stack:
        deployment = stack.pop()._bound_deployment
        names.add(deployment.name)
        for arg in [*deployment.init_args, *deployment.init_kwargs.values()]:
            stack += [a for a in (arg.values() if isinstance(arg, dict) else [arg]) if isinstance(a, Application)]
    return names


def serve_app(raw: dict):
    [app] = ServeDeploySchema.model_validate(raw).applications
    assert app.import_path == "deploy.app:app_builder"
    return app, CoeConfig.model_validate(app.args)


def test_serve_config_is_valid_for_ray_and_for_coe():
    app, config = serve_app(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    assert {d.name for d in app.deployments} == deployment_names(config) == {
        "CoeIngress", "ExpertPool-smollm2-135m"}
    total_cpus = sum(d.ray_actor_options.num_cpus for d in app.deployments)
    assert total_cpus <= 1, "fractional replicas: the app must schedule on a 2-core machine beside a test app"


def test_kuberay_rayservice_runs_experts_on_gpus_and_the_router_on_cpus():
    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    app, config = serve_app(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.backend.name == "vllm"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == deployment_names(config.model_copy(update={"backend": CoeConfig().backend}))
    pool = deployments["ExpertPool-smollm2-135m"]
    assert pool.ray_actor_options.num_gpus == 1 and pool.autoscaling_config["min_replicas"] >= 1
    ingress = deployments["CoeIngress"]  # routes in its own process: embedder and routers on CPUs, autoscaled
    assert not ingress.ray_actor_options.num_gpus and ingress.autoscaling_config["max_replicas"] > 1
    cluster = service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]}
    assert groups["gpu-experts"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu-router"]["resources"]["limits"]
    import ray

    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]


def test_the_committed_deployment_files_are_what_the_configs_generate():
    from deploy.manifests import generated_files

    for path, text in generated_files().items():
        assert path.read_text() == text, f"{path} drifted from its config: run python -m deploy.manifests"


def test_the_dockerfile_copies_what_exists_and_builds_the_image_kuberay_runs():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parent
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copied, "the Dockerfile copies the project"
    for sources in copied:
        for source in sources:
            assert (root / source).exists(), f"the Dockerfile copies {source}, which is not in the repo"
    packages = {p.split("*")[0] for p in __import__("tomllib").loads((root / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= {s[0] for s in copied}, "every package of pyproject.toml goes into the image"
    assert "./scripts/install.sh" in dockerfile  # installed as `make test` installs, weight packages included
    [tag] = [line.split(" -t ")[1].split()[0] for line in dockerfile.splitlines() if "docker build" in line]
    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    images = {c["image"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {tag}


@pytest.mark.parametrize("bad", [{"serve": {"ingress": {"max_queued_requests": -5}}},
                                 {"serve": {"admission": {"max_running": 0}}},
                                 {"serve": {"pools": {"default": {"models_per_replica": 0}}}},
                                 {"resilience": {"retries": -1}}, {"faults": {"rate": 1.5}}])
def test_bad_serve_and_resilience_settings_are_rejected(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CoeConfig.model_validate(bad)


def test_a_config_with_the_old_router_deployment_says_where_its_settings_went(tmp_path):
    from core.config import load_config
    from core.errors import ConfigError

    config = tmp_path / "coe.yaml"
    config.write_text("serve: {router: {max_queued_requests: 256}}\n")
    with pytest.raises(ConfigError, match=r"serve\.router is gone.*serve\.ingress.*serve\.admission"):
        load_config(config)
