"""Caption noise of the world's pretraining data: which scene an image shows for a caption."""

import random

import pytest

from diffalign.world import parse
from diffalign.world.caption_noise import NOISE_TYPES, mislabelled, noisy_scene
from diffalign.world.grammar import all_prompts
from diffalign.world.splits import has_heldout_pair, split


def test_each_type_makes_its_one_change():
    rng = random.Random(0)
    counts = {mislabelled(parse("three red circles"), "count", rng).groups[0].count for _ in range(50)}
    assert counts == {2, 4}
    assert mislabelled(parse("four red circles"), "count", rng).to_prompt() == "three red circles"
    assert mislabelled(parse("a red circle"), "count", rng).to_prompt() == "two red circles"
    assert (mislabelled(parse("a red circle left of a blue square"), "relation", rng).to_prompt()
            == "a red circle right of a blue square")
    assert (mislabelled(parse("a cyan square above a red circle"), "relation", rng).to_prompt()
            == "a cyan square below a red circle")
    assert (mislabelled(parse("a red circle and a magenta square"), "binding", rng).to_prompt()
            == "a magenta circle and a red square")


def test_types_apply_only_where_they_make_sense():
    rng = random.Random(0)
    assert mislabelled(parse("a red circle and a blue square"), "count", rng) is None
    assert mislabelled(parse("a red circle and a blue square"), "relation", rng) is None
    assert mislabelled(parse("two red circles"), "binding", rng) is None
    assert mislabelled(parse("a red circle and a red square"), "binding", rng) is None  # same colour: no swap
    with pytest.raises(ValueError, match="unknown caption-noise type 'shape'"):
        mislabelled(parse("a red circle"), "shape", rng)


def test_never_shows_a_heldout_pair():
    # red triangle + green circle swap to a green triangle: a held-out pair, so the image stays clean
    spec = parse("a red triangle and a green circle")
    assert mislabelled(spec, "binding", random.Random(0)) is None
    rng = random.Random(1)
    for prompt in split("pretrain"):
        for noise_type in NOISE_TYPES:
            changed = mislabelled(parse(prompt), noise_type, rng)
            assert changed is None or (not has_heldout_pair(changed) and changed != parse(prompt))


def test_rates_set_how_often_a_scene_is_mislabelled():
    rng = random.Random(0)
    prompt = "a red circle left of a magenta square"
    assert all(noisy_scene(prompt, {}, rng) == (parse(prompt), None) for _ in range(100))
    assert all(noisy_scene(prompt, {"relation": 1.0}, rng)[1] == "relation" for _ in range(100))
    kinds = [noisy_scene(prompt, {"relation": 0.3, "binding": 0.5}, rng)[1] for _ in range(4000)]
    # relation is drawn first (0.3); binding fires on half of the rest (0.35)
    assert kinds.count("relation") / 4000 == pytest.approx(0.3, abs=0.03)
    assert kinds.count("binding") / 4000 == pytest.approx(0.35, abs=0.03)
    # a type that does not apply never fires, whatever its rate
    assert all(noisy_scene("a red circle", {"relation": 1.0}, rng)[1] is None for _ in range(50))
    with pytest.raises(ValueError, match="unknown caption-noise types"):
        noisy_scene(prompt, {"colour": 0.1}, rng)


def test_seeded_rng_gives_the_same_scenes():
    prompts = list(all_prompts())[::40]
    rates = {"count": 0.3, "relation": 0.3, "binding": 0.15}
    a = [noisy_scene(p, rates, random.Random(7)) for p in prompts]
    b = [noisy_scene(p, rates, random.Random(7)) for p in prompts]
    assert a == b
