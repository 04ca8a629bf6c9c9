"""from_module's planning, without a pipeline: grouping, naming, placement."""

import pytest
import torch
from torch import nn

from asyncnn.partition import layer_stages


def test_one_stage_per_layer_named_after_it():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    stages = layer_stages(seq)
    assert [s.name for s in stages] == ["0:Linear", "1:ReLU", "2:Linear"]
    assert all(s.runs_on == "thread" for s in stages)


def test_groups_are_balanced_by_parameters_and_named_by_their_span():
    seq = nn.Sequential(nn.Linear(64, 64), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    stages = layer_stages(seq, stages=2)  # 4,161 parameters, then 3 x 21: the big one alone
    assert [s.name for s in stages] == ["0:Linear", "layers1-3"]
    assert isinstance(stages[1].fn, nn.Sequential) and len(stages[1].fn) == 3


def test_devices_place_the_groups_in_order():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    stages = layer_stages(seq, devices=["cpu", "cpu"])
    assert [s.device for s in stages] == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="2 device\\(s\\) for 1 stage\\(s\\)"):
        layer_stages(seq, stages=1, devices=["cpu", "cpu"])


def test_only_sequentials_are_split():
    with pytest.raises(TypeError, match=r"not an nn\.Sequential"):
        layer_stages(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no layers"):
        layer_stages(nn.Sequential())
