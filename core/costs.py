"""What a request costs: one definition for the whole service (results, metrics, cost-aware routing).

Every expert has prices in dollars per million tokens, input (prompt) and output (completion):
`prices: {input, output}` in its catalog entry. An expert without prices gets prices derived from
its active parameters, the parameters one token runs through (a full model's `params`; a LoRA
expert's adapter plus its base's):

    input  = 0.02 $ x (active parameters in billions)   per million prompt tokens
    output = 0.06 $ x (active parameters in billions)   per million completion tokens

Compute per token grows with the parameters a token runs through (about 2 FLOPs each), so price
follows them linearly. The anchor makes an 8B model cost $0.16 in / $0.48 out per million tokens,
the order of what hosts charge for 8B open models; output costs 3x input because decoding is
memory-bound at the batch sizes a server runs. SmolLM2-135M comes to $0.0027 / $0.0081. Set
`prices` in the catalog wherever the real price is known (every hosted API): the default only
makes local experts comparable with each other and with the API models beside them.

    request_cost = (prompt_tokens x input + completion_tokens x output) / 1,000,000   dollars
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from core.catalog import ExpertSpec

INPUT_DOLLARS_PER_BILLION_PARAMS = 0.02  # per million prompt tokens
OUTPUT_DOLLARS_PER_BILLION_PARAMS = 0.06  # per million completion tokens
TOKENS_PER_PRICE_UNIT = 1_000_000


class Prices(BaseModel):
    """Dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


def derived_prices(active_params: int) -> Prices:
    """The default prices of an expert whose active parameters are `active_params` (formula above)."""
    billions = active_params / 1e9
    return Prices(input=INPUT_DOLLARS_PER_BILLION_PARAMS * billions, output=OUTPUT_DOLLARS_PER_BILLION_PARAMS * billions)


def request_cost(spec: ExpertSpec, prompt_tokens: int, completion_tokens: int) -> float:
    """Dollars one answer of `spec` cost. The catalog fills every expert's prices when it loads
    (set, or derived); an expert whose parameters are unknown (its files missing) costs 0."""
    prices = spec.prices
    if prices is None:
        return 0.0
    return (prompt_tokens * prices.input + completion_tokens * prices.output) / TOKENS_PER_PRICE_UNIT
