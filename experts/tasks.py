"""The tasks the embedded LoRA experts are made for, with fixed train / held-out splits.

Training, the expert-vs-task table and the routing examples (written into the catalog by
`python -m evals.export_examples`) all take their splits from here, so an expert is never scored
on a question it was trained on or routed by. Serving never reads these files: a running coe
routes from the catalog alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.data import Item, in_share, load_benchmark

if TYPE_CHECKING:
    from core.catalog import Catalog


@dataclass(frozen=True)
class ExpertTask:
    name: str
    description: str
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...] = ()  # files that are held out as a whole
    categories: tuple[str, ...] = ()  # keep only these categories; empty = all
    heldout_share: float = 0.0  # where train and held-out come from one file: the held-out share
    answer_type: str | None = None  # overrides the data's answer type (how answers are scored)
    routing_files: tuple[str, ...] = ()  # more questions of the kind the expert should get, for routing only

    def _items(self, files: tuple[str, ...]) -> list[Item]:
        items = [item for f in files for item in load_benchmark(f)]
        items = [i for i in items if not self.categories or i.category in self.categories]
        if self.answer_type:
            items = [i.model_copy(update={"answer_type": self.answer_type}) for i in items]
        return items

    def train(self) -> list[Item]:
        return [i for i in self._items(self.train_files) if not in_share(i.id, self.heldout_share)]

    def routing_extra(self) -> list[Item]:
        return [item for f in self.routing_files for item in load_benchmark(f)]

    def heldout(self) -> list[Item]:
        if self.heldout_files:
            return self._items(self.heldout_files)
        return [i for i in self._items(self.train_files) if in_share(i.id, self.heldout_share)]


LOGIC_TASKS = (
    "boolean_expressions",
    "web_of_lies",
    "navigate",
    "sports_understanding",
    "formal_fallacies",
    "causal_judgement",
)

# What the general (base) expert answers: subjects no specialist was made for, and open chat.
GENERAL_CATEGORIES = (
    "high_school_us_history", "high_school_world_history", "high_school_european_history", "prehistory",
    "philosophy", "world_religions", "moral_disputes", "jurisprudence", "international_law", "us_foreign_policy",
    "high_school_government_and_politics", "sociology", "marketing", "management", "public_relations",
    "business_ethics", "high_school_geography", "miscellaneous", "global_facts", "security_studies",
    "writing", "roleplay", "extraction", "humanities", "coding",  # MT-Bench categories
)

TASKS: dict[str, ExpertTask] = {
    t.name: t
    for t in (
        # GSM8K is out of reach at 135M parameters (base and every adapter score 0-3%), so the math
        # expert learns to count: BBH object counting, answers scored as numbers. Arithmetic word
        # problems (GSM8K train) still route to it.
        ExpertTask(
            "math", "counting and arithmetic word problems (BIG-Bench Hard object counting)", ("bbh",),
            categories=("object_counting",), heldout_share=0.4, answer_type="number", routing_files=("gsm8k_train",),
        ),
        ExpertTask(
            "science", "grade-school science multiple choice (ARC-Challenge)",
            ("arc_challenge_train", "arc_challenge_dev"), ("arc_challenge_test",),
        ),
        ExpertTask("medicine", "medical entrance-exam multiple choice (MedMCQA)", ("medmcqa_dev",), heldout_share=0.2),
        ExpertTask(
            "logic", "yes/no and true/false logic puzzles (BIG-Bench Hard)", ("bbh",),
            categories=LOGIC_TASKS, heldout_share=0.4,
        ),
        ExpertTask(
            "general", "general knowledge and open chat (MMLU humanities and social sciences, MT-Bench)",
            ("mmlu_test", "mt_bench"), categories=GENERAL_CATEGORIES, heldout_share=0.3,
        ),
    )
}


def task_experts(catalog: Catalog) -> dict[str, str]:
    """Each task of TASKS that a LoRA expert of the catalog is made for, and that expert (the first
    such in catalog order), in catalog order."""
    experts: dict[str, str] = {}
    for expert in catalog.experts:
        if expert.kind == "lora" and expert.tasks and expert.tasks[0] in TASKS:
            experts.setdefault(expert.tasks[0], expert.name)
    return experts
