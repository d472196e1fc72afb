"""Write the embedded experts' routing examples into the catalog (experts/catalog/examples/).

    python -m evals.export_examples

Each expert of the default catalog with a task gets the first `--per-expert` training questions
of its task (after a seeded shuffle; the default expert `--default-expert` of them, its topics are
the most diverse), as a user would send them. Serving routes from these files alone, so an
installed coe needs no benchmark data; this command regenerates them from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import random

from core.catalog import DEFAULT_CATALOG, load_catalog
from core.prompts import user_prompt
from experts.tasks import TASKS


def examples_for(task_name: str, count: int, seed: int = 0) -> list[str]:
    """The task's own training questions first, then its routing-only extras (e.g. GSM8K for math)."""
    task = TASKS[task_name]
    items, extra = task.train(), task.routing_extra()
    random.Random(seed).shuffle(items)
    random.Random(seed).shuffle(extra)
    chosen = items[:count]
    chosen += extra[: count - len(chosen)]
    return [user_prompt(item) for item in chosen]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-expert", type=int, default=300)
    parser.add_argument("--default-expert", type=int, default=600)
    args = parser.parse_args(argv)
    catalog = load_catalog()
    out = DEFAULT_CATALOG.parent / "examples"
    out.mkdir(exist_ok=True)
    written = {}
    for spec in catalog.experts:
        if spec.examples_file is None or not spec.tasks or spec.tasks[0] not in TASKS:
            continue
        count = args.default_expert if spec.name == catalog.default_expert else args.per_expert
        texts = examples_for(spec.tasks[0], count)
        path = out / spec.examples_file.name
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        written[spec.name] = {"file": str(path.relative_to(DEFAULT_CATALOG.parent)), "examples": len(texts)}
    print(json.dumps(written, indent=1))


if __name__ == "__main__":
    main()
