"""The deployment files describe the same application as `coe serve`."""

from pathlib import Path

import yaml

from orchestrator.config import CoeConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_serve_config_is_valid_for_ray_and_for_coe():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    [app] = schema.applications
    assert app.import_path == "deploy.app:app_builder"
    CoeConfig.model_validate(app.args)
    from deploy import app as app_module

    assert callable(app_module.app_builder)
    names = {d.name for d in app.deployments}
    assert names == {"PipelineDeployment", "CoeIngress"}
