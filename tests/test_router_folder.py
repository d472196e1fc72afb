"""The versioned router folder (routers/folder.py): what its manifest records, and loads that
refuse, saying why: another format version, another embedder, damaged files, another router; and
policies that serve a folder (`router_path`) and refuse experts the catalog lacks."""

import json

import numpy as np
import pytest

from core.catalog import load_catalog
from core.config import PolicyConfig, load_config
from core.errors import CoeError, ConfigError
from routers import build_router, load_router
from routers.folder import FORMAT_VERSION
from routers.knn import KNNRouter
from tests.test_routers_outcomes import two_topics
from tests.test_routing import one_hot_embed


def fitted(name="knn", embed=one_hot_embed, **options):
    return build_router(name, embed=embed, costs={"a": 1.0, "b": 10.0, "c": 2.0}, **options).fit(two_topics())


def test_the_manifest_records_what_the_router_is_and_what_it_was_fitted_on(tmp_path):
    router = fitted(neighbours=3)
    router.fitted_on.source = "two topics"
    router.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz", "manifest.json", "router.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["router"] == "knn"
    assert manifest["options"] == {"costs": {"a": 1.0, "b": 10.0, "c": 2.0}, "neighbours": 3}  # not the embed function
    assert manifest["embedder"] == "one_hot_embed" and manifest["experts"] == ["a", "b", "c"]
    assert manifest["data"] == {"fingerprint": two_topics().fingerprint(), "rows": 12, "source": "two topics", "format": None}
    assert manifest["calibration"] is None and manifest["created"]["at"] and manifest["created"]["coe_version"]
    assert set(manifest["files"]) == {"router.json", "arrays.npz"}


def test_the_fingerprint_follows_the_data():
    data = two_topics()
    assert data.fingerprint() == two_topics().fingerprint()
    changed = two_topics()
    changed.outcomes[0, 0] = 0.5
    assert changed.fingerprint() != data.fingerprint()
    assert data.take([0, 1]).fingerprint() != data.fingerprint()


def test_calibration_is_recorded_and_survives_load_and_save(tmp_path):
    router = fitted(neighbours=3)
    texts = [f"{w} q{i}" for i in range(20) for w in ("alpha", "beta")]
    threshold, achieved = router.calibrate(texts, 0.9)  # b leads on half the queries at most
    assert router.calibration.max_share == 0.5 and achieved == 0.5 and threshold == 0.0
    router.save(tmp_path)
    loaded = load_router(tmp_path, embed=one_hot_embed)
    assert loaded.calibration == router.calibration and loaded.fitted_on == router.fitted_on
    assert loaded.created == router.created and loaded.options == router.options
    loaded.calibrate(texts, 0.0)
    loaded.save(tmp_path)
    again = load_router(tmp_path, embed=one_hot_embed)
    assert again.calibration.target_share == 0.0 and again.created == router.created  # created: when it was fitted
    assert [d.chosen[0].expert for d in again.route(["beta new"])] != ["b"]


def test_no_router_keeps_fitted_state_under_a_name_the_manifest_owns():
    # Router.fit and Router.load set the manifest's fields after a router's own _fit / set_state:
    # a fitted field of the same name would be wiped (RouterDC's calibration once was).
    from routers import ROUTERS
    from routers.folder import RouterManifest

    owned = (set(RouterManifest.model_fields) - {"experts"}) | {"fitted_on", "options"}
    for name, router_class in ROUTERS.items():
        fields = set(router_class.config_fields) | set(router_class.array_fields) | set(router_class.model_fields)
        assert not fields & owned, f"{name} saves {sorted(fields & owned)}"


def test_a_router_fitted_on_other_embeddings_is_refused(tmp_path):
    fitted().save(tmp_path)

    def other_embed(texts):
        return one_hot_embed(texts)

    with pytest.raises(CoeError, match="fitted on one_hot_embed embeddings, but this process embeds queries with .*other_embed"):
        load_router(tmp_path, embed=other_embed)


def test_the_shared_embedder_names_its_runtime_and_says_how_to_match_it(tmp_path, monkeypatch):
    import routers.embedder

    monkeypatch.setattr(routers.embedder, "_shared", None)
    monkeypatch.setenv("COE_EMBEDDER_RUNTIME", "torch")
    fitted().save(tmp_path)  # then say it was fitted on the default runtime's embeddings (fitting on them loads the model)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["embedder"] = "all-MiniLM-L6-v2-onnx-int8"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CoeError, match="this process embeds queries with all-MiniLM-L6-v2 .*COE_EMBEDDER_RUNTIME=onnx-int8"):
        load_router(tmp_path)  # the default embed function: the shared embedder, here on the torch runtime


def test_other_format_versions_and_legacy_folders_are_refused(tmp_path):
    fitted().save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CoeError, match=f"format version {FORMAT_VERSION + 1}, newer than this coe reads"):
        load_router(tmp_path, embed=one_hot_embed)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(CoeError, match="older than this coe reads"):
        load_router(tmp_path, embed=one_hot_embed)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CoeError, match="has no manifest.json: it was saved by a coe before router folders were versioned"):
        load_router(tmp_path, embed=one_hot_embed)
    with pytest.raises(CoeError, match="no saved router in"):
        load_router(tmp_path / "nothing")


def test_damaged_or_half_rewritten_files_are_refused(tmp_path):
    fitted().save(tmp_path)
    arrays = dict(np.load(tmp_path / "arrays.npz"))
    arrays["prior"] = arrays["prior"] + 0.1
    np.savez(tmp_path / "arrays.npz", **arrays)
    with pytest.raises(CoeError, match="arrays.npz does not match its manifest"):
        load_router(tmp_path, embed=one_hot_embed)


def test_a_folder_loads_only_as_its_own_router(tmp_path):
    fitted("coe").save(tmp_path)
    with pytest.raises(CoeError, match="holds a coe router, not knn"):
        KNNRouter.load(tmp_path, embed=one_hot_embed)
    assert load_router(tmp_path, embed=one_hot_embed).name == "coe"


def test_saving_over_a_file_says_so(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(CoeError, match="it is a file"):
        fitted().save(tmp_path / "taken")


# -- policies that serve a router folder ---------------------------------------------------------

def shared_named_embed(texts):
    """Stands in for the shared embedder at fitting time (same name), so policies load the folder
    with the default embed function; these tests never route, so no model loads."""
    return one_hot_embed(texts)


def fit_on_catalog_names(directory, experts):
    from routers.embedder import shared_embedder

    shared_named_embed.embedder_name = shared_embedder().name
    data = two_topics()
    data.experts = experts
    build_router("knn", embed=shared_named_embed, neighbours=3).fit(data).save(directory)


def test_a_policy_serves_a_router_folder_and_refuses_experts_the_catalog_lacks(tmp_path):
    from orchestrator.policies import build_policies

    catalog = load_catalog()
    fit_on_catalog_names(tmp_path / "mine", ["smollm2-math", "smollm2-science", "smollm2-135m"])
    fit_on_catalog_names(tmp_path / "foreign", ["smollm2-math", "gpt-4o", "claude"])
    routers = build_policies({"mine": PolicyConfig(router_path=tmp_path / "mine", options={"cost_threshold": 0.2})}, catalog)
    assert routers["mine"].experts == ["smollm2-math", "smollm2-science", "smollm2-135m"]
    assert routers["mine"].neighbours == 3 and routers["mine"].cost_threshold == 0.2
    with pytest.raises(ConfigError, match="policy 'theirs': the router in .*foreign routes to experts the catalog lacks: gpt-4o, claude"):
        build_policies({"theirs": PolicyConfig(router_path=tmp_path / "foreign")}, catalog)
    with pytest.raises(ConfigError, match="holds a knn router, not coe"):
        build_policies({"mine": PolicyConfig(router="coe", router_path=tmp_path / "mine")}, catalog)


def test_router_path_is_relative_to_the_config_file_and_checked(tmp_path):
    fit_on_catalog_names(tmp_path / "routers" / "mine", ["smollm2-math", "smollm2-science", "smollm2-135m"])
    config = tmp_path / "coe.yaml"
    config.write_text("default_policy: mine\npolicies: {mine: {router_path: routers/mine}}\n")
    assert load_config(config).policies["mine"].router_path == (tmp_path / "routers" / "mine").resolve()
    config.write_text("default_policy: mine\npolicies: {mine: {router_path: routers/gone}}\n")
    with pytest.raises(ConfigError, match="policies.mine.router_path: folder .*routers/gone does not exist"):
        load_config(config)
    config.write_text("default_policy: mine\npolicies: {mine: {router_path: routers/mine, options: {neighbours: 5}}}\n")
    with pytest.raises(ConfigError, match=r"options \['neighbours'\] are fixed when a router is fitted"):
        load_config(config)
