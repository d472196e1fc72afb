"""Where a new vLLM engine computes on a CPU (experts/placement.py): alone, on vLLM's own choice
(every core but the last); beside others, on the cores they use least, so two engines on two
cores do not share one."""

import pytest

from experts.placement import bind_string, cores_for_new_engine


def test_an_engine_alone_gets_every_core_but_the_last_as_vllm_would_choose():
    assert cores_for_new_engine([0, 1], []) == [0]
    assert cores_for_new_engine(list(range(16)), []) == list(range(15))
    assert cores_for_new_engine([5], []) == [5]  # one core: nothing to leave free


def test_engines_beside_others_take_the_least_used_cores():
    assert cores_for_new_engine([0, 1], [[0]]) == [1]  # the second engine on the core the first left free
    assert cores_for_new_engine([0, 1], [[0], [1]]) == [0]
    assert cores_for_new_engine([0, 1], [[0], [1], [0]]) == [1]
    second = cores_for_new_engine(list(range(16)), [list(range(15))])
    assert len(second) == 7 and 15 in second  # (16 - 1) // 2 cores, the free one among them
    assert cores_for_new_engine([2, 3], [[0], [1]]) == [2]  # cores outside the process's set do not count


def test_no_core_is_an_error_and_bindings_read_as_vllm_expects():
    with pytest.raises(ValueError):
        cores_for_new_engine([], [])
    assert bind_string([0, 3, 4]) == "0,3,4"
