"""Caption noise: pretraining images that show a slightly different scene from their caption.

Real text-to-image models learn from web alt-text, which often gets counts, left/right and
which colour belongs to which object wrong; that is a large part of why they follow prompts
imperfectly while still "knowing" the right answer (it is in their distribution, just not
reliably sampled), and it is the kind of imperfection that preference alignment repairs. The
world's pretraining data simulates it: with a per-type probability, an image is rendered from
a *mislabelled* scene, one change away from what its caption says:

- ``count``: one more or one fewer object than the caption's count (single / counting);
- ``relation``: the mirrored relation ("left of" drawn as "right of", "above" as "below");
- ``binding``: the two objects' colours swapped ("a red circle and a blue square" drawn as a
  blue circle and a red square).

A mislabelled scene never contains a held-out (colour, shape) pair (pretraining must not show
those), so a swap that would create one leaves the image clean. Rates are per prompt kind's
applicable types; a caption with several applicable types draws them in the order above and
uses the first that fires.
"""

from __future__ import annotations

import random
from dataclasses import replace

from .grammar import COUNTS, INVERSE_RELATION, ObjectGroup, Relation, Spec, as_spec
from .splits import has_heldout_pair

NOISE_TYPES = ("count", "relation", "binding")


def mislabelled(spec: Spec, noise_type: str, rng: random.Random) -> Spec | None:
    """``spec`` with one ``noise_type`` change, or None when the type does not apply to it or
    the change would show a held-out pair."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown caption-noise type {noise_type!r}; types are {NOISE_TYPES}")
    out = None
    if noise_type == "count" and len(spec.groups) == 1:
        g = spec.groups[0]
        counts = [n for n in (g.count - 1, g.count + 1) if n in COUNTS]
        out = Spec((replace(g, count=counts[int(rng.random() * len(counts))]),))
    elif noise_type == "relation" and spec.relation is not None:
        r = spec.relation
        out = Spec(spec.groups, Relation(r.subject, INVERSE_RELATION[r.relation], r.object))
    elif noise_type == "binding" and len(spec.groups) == 2:
        a, b = spec.groups
        if a.colour != b.colour:
            out = Spec((ObjectGroup(1, b.colour, a.shape), ObjectGroup(1, a.colour, b.shape)), spec.relation)
    if out is None or has_heldout_pair(out):
        return None
    return out


def noisy_scene(prompt, rates: dict[str, float], rng: random.Random) -> tuple[Spec, str | None]:
    """The scene to render for caption ``prompt``: ``(spec, noise type or None if clean)``.

    ``rates`` maps noise types to probabilities (missing types: 0). For each type with a rate
    that applies, the changed scene is drawn first (``count`` takes one draw to pick -1 or +1)
    and then the rate, so a seeded ``rng`` gives the same scenes on every machine; the shipped
    models were pretrained with exactly this order of draws.
    """
    unknown = set(rates) - set(NOISE_TYPES)
    if unknown:
        raise ValueError(f"unknown caption-noise types {sorted(unknown)}; types are {NOISE_TYPES}")
    spec = as_spec(prompt)
    for noise_type in NOISE_TYPES:
        rate = rates.get(noise_type, 0.0)
        if rate <= 0:
            continue
        changed = mislabelled(spec, noise_type, rng)
        if changed is not None and rng.random() < rate:
            return changed, noise_type
    return spec, None
