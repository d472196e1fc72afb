"""Batch planning: group a round's work by the experts assigned to it, so that each expert loads at
most once per round, resident experts first. (Aggregation is a later round of the engine's loop:
a synthesis is one more generation, a vote needs none.)

Plain Python over plain data (the scheduler of the system, in vLLM's sense): the memory pool
(experts/pool.py) and the backends execute the plan; the plan's `order` is announced to the pool
so that its eviction knows which experts come next.
"""

from __future__ import annotations

from core.types import Decision, Plan, PlanGroup, PoolState


def plan(decisions: list[Decision], pool: PoolState | None = None) -> Plan:
    """`plan_work` for every chosen expert of every decision."""
    return plan_work([(d.query_id, s.expert) for d in decisions for s in d.chosen], pool)


def plan_work(work: list[tuple[str, str]], pool: PoolState | None = None) -> Plan:
    """(query id, expert) pairs to run: one group per distinct expert. Experts on one base run
    back to back (the base loads once and a mixed-LoRA stage runs in one forward pass). Bases already on the device run first
    (no load to wait for), then the rest by amount of work, largest first, so the most work
    starts soonest; within a base, experts already on the device first, then by group size."""
    pool = pool or PoolState()
    members: dict[str, list[str]] = {}
    for query_id, expert in work:
        ids = members.setdefault(expert, [])
        if query_id not in ids:
            ids.append(query_id)
    first_seen = {expert: i for i, expert in enumerate(members)}

    def base_of(expert: str) -> str:
        return pool.parents.get(expert, expert)

    def on_device(expert: str) -> bool:  # a remote expert is always ready: its server holds it
        return pool.tier(expert) in ("device", "remote")

    families: dict[str, list[str]] = {}
    for expert in members:
        families.setdefault(base_of(expert), []).append(expert)
    work = {base: sum(len(members[e]) for e in experts) for base, experts in families.items()}
    base_order = sorted(families, key=lambda b: (not on_device(b), -work[b], min(first_seen[e] for e in families[b])))

    groups: list[PlanGroup] = []
    for base in base_order:
        experts = sorted(families[base], key=lambda e: (not on_device(e), -len(members[e]), first_seen[e]))
        groups += [PlanGroup(expert=e, query_ids=members[e], base=base) for e in experts]

    to_load = [e for base in base_order for e in dict.fromkeys([base, *families[base]]) if not on_device(e)]
    return Plan(
        groups=groups,
        loads=len(to_load),
        load_bytes=sum(pool.sizes.get(e, 0) for e in to_load),
        read_bytes=sum(pool.sizes.get(e, 0) for e in to_load if pool.tier(e) == "disk"),
    )
