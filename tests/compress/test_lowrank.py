"""Low-rank decomposition (archc/compress/lowrank_algebra.py, archc/compress/lowrank.py, `archc
lowrank`): the SVD and Tucker-2 factors against the layers they replace, exact at full rank,
energies, MACs only lowered, checkpoints that `archc info` reads with the same figures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import archc
from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.compress.lowrank import LowRankError, decompose, decompose_to_macs
from archc.compress.lowrank_algebra import (
    frobenius_relative_error,
    mode_singular_values,
    rank_for_energy,
    spatial_factors,
    spatial_weight,
    svd_factors,
    tucker2_factors,
    tucker2_weight,
)
from tests.compress.test_pruning import NARROW_RESNET

G = torch.Generator().manual_seed(0)


def test_svd_factors_full_rank_exact_and_truncation_is_eckart_young():
    w = torch.randn(6, 9, dtype=torch.float64, generator=G)
    a, b = svd_factors(w, 6)
    torch.testing.assert_close(b @ a, w, rtol=1e-12, atol=1e-12)
    a, b = svd_factors(w, 2)
    s = torch.linalg.svdvals(w)
    # the error of the best rank-2 approximation is the norm of the dropped singular values
    assert abs(float((b @ a - w).norm()) - float(s[2:].norm())) < 1e-10
    with pytest.raises(ValueError):
        svd_factors(w, 7)


def test_tucker2_chain_equals_the_conv_at_full_rank():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=True).double()
    first, core, last = tucker2_factors(conv.weight.detach(), 7, 5)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64, generator=G)
    y = F.conv2d(F.conv2d(F.conv2d(x, first), core, stride=2, padding=1), last, conv.bias)
    torch.testing.assert_close(y, conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tucker2_weight(first, core, last), conv.weight.detach())
    # truncated: the chain computes exactly its reconstructed weight
    first, core, last = tucker2_factors(conv.weight.detach(), 3, 2)
    y = F.conv2d(F.conv2d(F.conv2d(x, first), core, stride=2, padding=1), last, conv.bias)
    torch.testing.assert_close(y, F.conv2d(x, tucker2_weight(first, core, last), conv.bias,
                                           stride=2, padding=1))
    assert 0 < frobenius_relative_error(conv.weight, tucker2_weight(first, core, last)) < 1


def test_spatial_kx1_1xk_chain_equals_the_conv_at_full_rank():
    conv = nn.Conv2d(5, 7, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    x = torch.randn(2, 5, 11, 12, dtype=torch.float64, generator=G)

    def chain(vertical, horizontal):
        y = F.conv2d(x, vertical, stride=(2, 1), padding=(1, 0))
        return F.conv2d(y, horizontal, conv.bias, padding=(0, 2), dilation=(1, 2))

    vertical, horizontal = spatial_factors(conv.weight.detach(), 15)  # min(5 * 3, 7 * 5)
    torch.testing.assert_close(chain(vertical, horizontal), conv(x), rtol=1e-12, atol=1e-12)
    vertical, horizontal = spatial_factors(conv.weight.detach(), 4)
    approx = spatial_weight(vertical, horizontal)
    torch.testing.assert_close(chain(vertical, horizontal),
                               F.conv2d(x, approx, conv.bias, stride=(2, 1), padding=(1, 2),
                                        dilation=(1, 2)))
    assert 0 < frobenius_relative_error(conv.weight, approx) < 1


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert [rank_for_energy(s, e) for e in (0.5, 9 / 14, 0.7, 0.92, 0.99, 1.0)] == [
        1, 1, 2, 2, 3, 4]
    assert rank_for_energy(torch.zeros(3), 0.5) == 1
    out, cin = mode_singular_values(torch.randn(4, 3, 3, 3))
    assert out.shape == (4,) and cin.shape == (3,)



@pytest.mark.slow
def test_graph_chains_exact_at_full_rank_and_lower_macs_when_truncated():
    gm = archc.build(NARROW_RESNET, init="random").double()  # 3x3 and 1x1 convs, a Linear
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=G)
    full = decompose(gm, x, 1.0, only_if_cheaper=False)
    kinds = {layer.kind for layer in full.layers}
    assert len(full.layers) == 21 and kinds == {"svd", "tucker2"} and full.output_error < 1e-10
    assert isinstance(full.graph_module.get_submodule("s1.b1.f.a.conv_lowrank.2"), nn.Conv2d)
    assert isinstance(full.graph_module.get_submodule("head.fc_lowrank.1"), nn.Linear)
    spatial = decompose(gm, x, 1.0, only_if_cheaper=False, kxk="spatial")
    assert {layer.kind for layer in spatial.layers} == {"svd", "spatial"}
    assert spatial.output_error < 1e-10
    by_kind = {kind: {layer.name: layer.macs_after for layer in decompose(
        gm, x, 0.6, only_if_cheaper=False, kxk=kind).layers} for kind in ("spatial", "tucker2")}
    cheaper = decompose(gm, x, 0.6, only_if_cheaper=False, kxk="cheaper")
    kinds = set()
    for layer in cheaper.layers:  # each 3x3 conv took the cheaper of its two chains
        assert layer.macs_after == min(by_kind["spatial"][layer.name],
                                       by_kind["tucker2"][layer.name])
        kinds.add(layer.kind)
    assert "svd" in kinds and len(kinds) > 1
    assert decompose(gm, x, 1.0).layers == []  # full rank never saves MACs: nothing replaced
    low = decompose(gm, x, 0.5)
    assert low.layers and low.macs[1] < low.macs[0]
    assert all(layer.macs_after < layer.macs_before for layer in low.layers)
    assert low.output_error > 0


@pytest.mark.slow
def test_cli_lowrank_matches_info_and_bad_input(tmp_path, capsys):
    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump(NARROW_RESNET))
    ckpt, out = tmp_path / "m.pt", tmp_path / "lr.pt"
    assert main(["build", str(spec), "-o", str(ckpt), "-q"]) == 0
    capsys.readouterr()
    assert main(["lowrank", str(ckpt), "--energy", "0.6", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"][1] < report["macs"][0] and report["layers"]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] == report["macs"][1] and info["params"] == report["params"][1]
    _, gm = load_checkpoint(out)
    assert any(name.endswith("_lowrank.2") for name, _ in gm.named_modules())
    digits = tmp_path / "digits.pt"
    assert main(["build", "bench/compression/digits_resnet.yaml", "-o", str(digits), "-q"]) == 0
    capsys.readouterr()
    assert main(["lowrank", str(digits), "--energy", "0.8", "--data", "digits", "-o",
                 str(tmp_path / "d.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["error_measured_on"] == "256 validation images of digits"
    assert report["output_error"] > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["lowrank", str(ckpt), "--energy", "1.5", "-o", str(out)])
    assert exit_info.value.code == 2
    with pytest.raises(LowRankError):
        decompose_to_macs(gm, torch.randn(1, 3, 32, 32), 1.5)
