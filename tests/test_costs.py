"""The cost model against real training runs of the bundled model on this machine (LoRA and full).

Each run is a fresh subprocess (its peak RSS is its own). Peak memory is asserted within MEMORY_TOL
(a factor either way). Speed is not a timed assertion (it moves with the machine's load): the test
only catches a cost model that is off by an order of magnitude (TIME_SANITY, e.g. a unit slip);
bench/cost_model.py prints the speed comparison as a table against its 1.35x target.
"""

import pytest

from tunewise.advise.check import measure_training

from .conftest import BANKING_TRAIN

pytestmark = pytest.mark.integration
# an order of magnitude, as the docstring says: machines of this kind differ (a probed float32 matmul rate of 55 to 300
# GFLOP/s), and the probe's rate does not carry over to full fine-tuning alike everywhere (0.28x of the prediction on a
# machine probed at 299 GFLOP/s, in the suite and alone), so a factor of 3 failed there on unchanged code
TIME_SANITY = 10.0
MEMORY_TOL = 1.25


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cost_model_predicts_time_and_memory(tmp_path, method):
    r = measure_training(tmp_path, BANKING_TRAIN, "bundled:smollm2-135m-instruct", method, steps=4)
    print(f"{method}: tokens/s measured {r['measured_tokens_per_s']:.0f} predicted {r['predicted_tokens_per_s']:.0f} "
          f"(ratio {r['time_ratio']:.2f}); peak GB measured {r['measured_peak_gb']:.2f} predicted {r['predicted_peak_gb']:.2f} "
          f"(ratio {r['memory_ratio']:.2f})")
    assert 1 / TIME_SANITY <= r["time_ratio"] <= TIME_SANITY
    assert 1 / MEMORY_TOL <= r["memory_ratio"] <= MEMORY_TOL
