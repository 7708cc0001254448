from __future__ import annotations

import pytest


def test_actor_pools_leave_cpus_for_decoding():
    from distillery.engine.job import StageSpec, plan_actor_cpus

    two = [StageSpec(object, {}, actors=1), StageSpec(object, {}, actors=1)]
    assert plan_actor_cpus(2, 2, two) == 0.75  # 1.5 of 2 CPUs to the actors, 0.5 to decoding
    assert plan_actor_cpus(64, 16, two) == 16  # never more than one node has
    assert plan_actor_cpus(8, 8, two) == 3.0
    with pytest.raises(ValueError, match="do not fit"):
        plan_actor_cpus(1, 1, [StageSpec(object, {}, actors=20)])
