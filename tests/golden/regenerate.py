"""Regenerate the golden outputs. The ONLY writer of tests/golden/; run it on purpose:

    python tests/golden/regenerate.py [SPEC ...]

then review `git diff tests/golden/` (the .json histograms and manifest show structural and
version changes; the .npz hold the numbers) before committing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests/
from tests import golden_suite as suite  # noqa: E402


def main(names: list[str]) -> None:
    names = names or suite.spec_names()
    manifest_path = suite.GOLDEN / "manifest.json"
    entries = json.loads(manifest_path.read_text())["specs"] if manifest_path.exists() else {}
    for name in names:
        print(f"golden: {name}", flush=True)
        arrays, structure = suite.compute(name)
        np.savez_compressed(suite.GOLDEN / f"{name}.npz", **arrays)
        (suite.GOLDEN / f"{name}.json").write_text(json.dumps(structure, indent=1) + "\n")
        entries[name] = {"input_sha256_16": suite.digest(arrays["input"]),
                         "input_shape": list(arrays["input"].shape)}
    for stale in set(entries) - set(suite.spec_names()):
        del entries[stale]
    manifest = {
        "generator": "numpy PCG64(SeedSequence([seed, crc32(tensor name)])) via archc.ir.init",
        "weights": "archc.ir.init.randomize: BN statistics calibrated on a random batch, perturbed",
        "seed": suite.SEED, "batch": suite.BATCH, "input_size": suite.INPUT_SHAPE_HW,
        "opset": suite.OPSET, "rtol": suite.RTOL,
        "tolerance": "relative error <= max(rtol, 10 x the model's own float32 rounding)",
        "versions": suite.versions(), "specs": dict(sorted(entries.items())),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
