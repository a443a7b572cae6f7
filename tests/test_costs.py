"""The cost model against real training runs of the bundled model on this machine (LoRA and full).

Each run is a fresh subprocess (its peak RSS is its own). Tolerances: predicted tokens/s and peak
memory within TIME_TOL and MEMORY_TOL of the measured values (a factor either way); bench/cost_model.py
prints the same comparison as a table.
"""

import pytest

from tunewise.advise.check import measure_training

from .conftest import BANKING_TRAIN

pytestmark = pytest.mark.integration
TIME_TOL = 1.35
MEMORY_TOL = 1.25


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cost_model_predicts_time_and_memory(tmp_path, method):
    r = measure_training(tmp_path, BANKING_TRAIN, "bundled:smollm2-135m-instruct", method, steps=4)
    print(f"{method}: tokens/s measured {r['measured_tokens_per_s']:.0f} predicted {r['predicted_tokens_per_s']:.0f} "
          f"(ratio {r['time_ratio']:.2f}); peak GB measured {r['measured_peak_gb']:.2f} predicted {r['predicted_peak_gb']:.2f} "
          f"(ratio {r['memory_ratio']:.2f})")
    assert 1 / TIME_TOL <= r["time_ratio"] <= TIME_TOL
    assert 1 / MEMORY_TOL <= r["memory_ratio"] <= MEMORY_TOL
