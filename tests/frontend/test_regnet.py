"""RegNet lowering: the 24 zoo models exactly, and the generator against an independent oracle."""

from __future__ import annotations

import json
import math
from itertools import groupby
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.cli.main import main
from archc.frontend.loading import load_spec
from archc.frontend.regnet import generate_widths

ROOT = Path(__file__).resolve().parents[2]
# pycls' published complexity of the 24 zoo models (dev/model_complexity.json and zoo configs)
REFERENCE = json.loads((ROOT / "tests/data/regnet_models.json").read_text())
ZOO = {m["name"].lower().replace("-", "_"): m for m in REFERENCE}


def test_every_zoo_model_has_a_spec():
    assert sorted(p.stem for p in (ROOT / "specs").glob("regnet*.yaml")) == sorted(ZOO)
    assert len(ZOO) == 24


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_complexity_is_exact(name, capsys):
    assert main(["info", str(ROOT / "specs" / f"{name}.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ref = ZOO[name]
    assert (info["flops"], info["params"], info["acts"]) == (
        ref["flops"],
        ref["params"],
        ref["acts"],
    )
    stages = [row for row in info["stages"] if "depth" in row]
    assert [s["depth"] for s in stages] == ref["ds"]
    assert [s["width"] for s in stages] == ref["ws"]
    assert [s["group_width"] for s in stages] == ref["gs"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_spec_is_the_papers_config(name):
    body, ref = load_spec(ROOT / "specs" / f"{name}.yaml").body, ZOO[name]
    assert (body.depth, body.w0, body.wa, body.wm, body.group_width) == (
        ref["DEPTH"],
        ref["W0"],
        ref["WA"],
        ref["WM"],
        ref["GROUP_W"],
    )
    assert body.bottleneck == ref["BOT_MUL"]
    assert (body.se_ratio > 0) == ref["SE_ON"]


def oracle_stages(d, w0, wa, wm, g, bm, q=8):
    """REGNET.md steps 1-3, written independently: pure Python floats, builtin round (half-even)."""
    block_widths = []
    for j in range(d):
        u = w0 + wa * j
        k = round(math.log(u / w0) / math.log(wm))
        block_widths.append(round(w0 * wm**k / q) * q)
    runs = [(w, len(list(group))) for w, group in groupby(block_widths)]
    stages = []
    for w, depth in runs:
        v = int(max(1, w * bm))
        gw = int(min(g, v))
        m = math.lcm(gw, int(bm)) if bm > 1 else gw
        v = max(m, int(round(v / m) * m))
        stages.append((depth, int(v / bm), gw))
    return stages


regnet_params = st.fixed_dictionaries(
    {
        "depth": st.integers(1, 40),
        "w0": st.integers(1, 32).map(lambda n: 8 * n),
        "wa": st.floats(0, 256).map(lambda x: round(x, 2)),
        "wm": st.floats(1.5, 3.0).map(lambda x: round(x, 3)),
        "group_width": st.sampled_from([1, 2, 4, 8, 16, 24, 32, 48, 64, 128]),
        "bottleneck_multiplier": st.sampled_from([1.0, 0.5, 0.25, 2.0, 4.0]),
    }
)


@settings(max_examples=400, deadline=None)
@given(regnet_params)
def test_lowering_matches_independent_oracle(params):
    spec = load_spec({"name": "r", "body": {"type": "regnet", "num_stages": None, **params}})
    lowered = [(s.depth, s.width, s.group_width) for s in spec.stages()]
    expected = oracle_stages(
        params["depth"],
        params["w0"],
        params["wa"],
        params["wm"],
        params["group_width"],
        params["bottleneck_multiplier"],
    )
    assert lowered == expected
    assert all(
        s.stride == 2 and s.bottleneck == params["bottleneck_multiplier"] for s in spec.stages()
    )


@pytest.mark.parametrize(
    "name, tie", [("regnetx_1.6gf", 22.5), ("regnetx_400mf", 24.5), ("regnety_800mf", 48.5)]
)
def test_half_even_ties_are_rounded_like_pycls(name, tie):
    """The three zoo models whose rounding hits an exact .5: half-up would change them."""
    ref = ZOO[name]
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    assert (
        generate_widths(ref["DEPTH"], ref["W0"], ref["WA"], ref["WM"]).widths == ref["ws_generated"]
    )
    assert [s.width for s in spec.stages()] == ref["ws"]


def test_paper_ratio_is_the_reciprocal_of_the_pycls_multiplier():
    common = {"name": "r", "body": {"type": "anynet", "stages": [{"depth": 1, "width": 64}]}}
    by_ratio = load_spec(
        {
            **common,
            "body": {
                "type": "anynet",
                "stages": [{"depth": 1, "width": 64, "bottleneck_ratio": 4}],
            },
        }
    )
    by_multiplier = load_spec(
        {
            **common,
            "body": {
                "type": "anynet",
                "stages": [{"depth": 1, "width": 64, "bottleneck_multiplier": 0.25}],
            },
        }
    )
    assert by_ratio.stages()[0].bottleneck == by_multiplier.stages()[0].bottleneck == 0.25
