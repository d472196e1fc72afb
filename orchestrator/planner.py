"""Batch planning: group a batch's queries by the experts assigned to them, so that each expert
loads at most once per batch, resident experts first.

Plain Python over plain data (the scheduler of the system, in vLLM's sense): the pool and the
backends execute the plan.
"""

from __future__ import annotations

from collections.abc import Collection

from orchestrator.types import Decision, Plan, PlanGroup


def plan(decisions: list[Decision], resident: Collection[str] = ()) -> Plan:
    """One group per distinct chosen expert. Resident experts run first (no load to wait for),
    then the rest by size of group, largest first, so the most work starts soonest."""
    members: dict[str, list[str]] = {}
    for decision in decisions:
        for choice in decision.chosen:
            members.setdefault(choice.expert, []).append(decision.query_id)
    first_seen = {expert: i for i, expert in enumerate(members)}
    order = sorted(members, key=lambda e: (e not in resident, -len(members[e]), first_seen[e]))
    return Plan(
        groups=[PlanGroup(expert=e, query_ids=members[e]) for e in order],
        loads=sum(1 for e in order if e not in resident),
    )
