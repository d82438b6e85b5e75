"""moe_course/moe_measurements.py (chapter 01's measurements of the torch layer) on the CPU:
every step is timed, the shares add up, memory is counted, and the table and chart show it."""

import matplotlib.pyplot as plt
import pytest
import torch

from moe_course import configs, moe
from moe_course import moe_measurements as mm


def test_scaled_keeps_the_routing():
    assert tuple(mm.scaled(configs.MoEShape(1024, 512, 256, 64, 8), 8)) == (128, 64, 32, 64, 8)


def test_step_clock_times_each_step_in_order():
    clock = mm.StepClock("cpu")
    for step in mm.STEPS:
        clock.mark(step)
    ms = clock.ms()
    assert list(ms) == list(mm.STEPS) and all(t >= 0 for t in ms.values())


def test_measure_layer_on_the_cpu(capsys):
    shape = configs.MoEShape(T=64, d=32, n=16, E=8, K=2)
    # 9 calls: a share is a median over calls, and a call the OS interrupts (a busy machine: CI
    # failed at 3 calls, 0.67) moves its steps' shares; the medians of 9 stay near 1
    row = mm.measure_layer("tiny", shape, "cpu", torch.float32, reps=9)
    assert set(row["step_ms"]) == set(mm.STEPS)
    assert sum(row["step_share"].values()) == pytest.approx(1.0, abs=0.1)  # medians of shares: close to 1
    assert row["outside_experts_share"] == pytest.approx(1 - row["step_share"]["experts"])
    assert row["analytic_activation_bytes"] == sum(moe.activation_bytes(shape, 4).values())
    assert "measured_kept_bytes" not in row  # counted on the CPU, measured only on a GPU
    mm.print_rows([row])
    assert "tiny" in capsys.readouterr().out
    _, ax = plt.subplots()
    mm.draw_steps([row], ax, "tiny")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(mm.STEPS)
    plt.close("all")


def test_the_steps_are_the_ones_moe_forward_marks():
    marked = []
    w = moe.random_weights(8, 4, 4)
    moe.moe_forward(torch.randn(6, 8), w, 2, on_step=marked.append)
    assert tuple(marked) == mm.STEPS
