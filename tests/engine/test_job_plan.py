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


def test_gpu_actors_share_the_gpus_so_every_stage_starts():
    from distillery.engine.job import StageSpec, plan_actor_gpus

    det, seg = StageSpec(object, {}, actors=1, wants_gpu=True), StageSpec(object, {}, actors=1, wants_gpu=True)
    # one GPU, a detector and a segmenter actor: half each (a whole GPU each never schedules the second)
    assert plan_actor_gpus(1, [det, seg]) == 0.5
    assert plan_actor_gpus(8, [det, seg]) == 1.0  # an actor drives one device
    assert plan_actor_gpus(1, [det, StageSpec(object, {}, actors=2, wants_gpu=True)]) == 0.33
    assert plan_actor_gpus(0, [det, seg]) is None
    assert plan_actor_gpus(4, [StageSpec(object, {}, actors=1)]) is None
    with pytest.raises(ValueError, match="do not fit"):
        plan_actor_gpus(1, [StageSpec(object, {}, actors=101, wants_gpu=True)])
