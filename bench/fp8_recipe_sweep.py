"""FP8 recipes and formats side by side with bf16: final training loss of the 200-step run per lr.

The same model, data and loop as the GPU test (tests/gpu/test_te.py). It shows how the FP8 ↔ bf16
difference depends on the learning rate: at high rates, and once the model has memorised the small
corpus, run-to-run noise exceeds the test's 5% bound. Needs CUDA and Transformer Engine.

    python bench/fp8_recipe_sweep.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.gpu.test_te import train  # noqa: E402  (the same model, data and loop as the GPU test)

RUNS = [(None, "hybrid"), ("delayed", "hybrid"), ("delayed", "e4m3"), ("current", "hybrid"),
        ("current", "e4m3"), ("block", "e4m3")]


def main() -> None:
    rows = []
    for lr in (1e-3, 3e-4):
        for recipe, fmt in RUNS:
            start = time.time()
            losses, _, _, _ = train(recipe, lr=lr, fp8_format=fmt)
            rows.append((lr, recipe or "bf16", fmt, losses[0], sum(losses[-10:]) / 10, time.time() - start))
    print("lr      recipe   format  first   final(last 10)  vs_bf16  seconds")
    for lr, recipe, fmt, first, final, secs in rows:
        bf16 = next(r[4] for r in rows if r[0] == lr and r[1] == "bf16")
        print(f"{lr:<7g} {recipe:8s} {fmt:7s} {first:.3f}  {final:14.4f}  {final / bf16 - 1:+7.2%}  {secs:5.1f}")


if __name__ == "__main__":
    main()
