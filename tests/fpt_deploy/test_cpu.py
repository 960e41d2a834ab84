"""CPU feature detection and the bf16 warning on CPUs that emulate bf16."""

from __future__ import annotations

import logging

import pytest

from fpt_deploy import cpu
from fpt_deploy.cpu import CpuFeatures


@pytest.mark.parametrize(
    "flags, bf16, vnni, avx512",
    [
        ({"avx2"}, False, False, False),  # AMD Zen 3
        ({"avx2", "avx_vnni"}, False, True, False),
        ({"avx2", "avx512f", "avx512_vnni"}, False, True, True),  # Cascade Lake
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}, True, True, True),  # Sapphire Rapids
    ],
)
def test_features_from_flags(flags, bf16, vnni, avx512):
    f = CpuFeatures(model="cpu", flags=frozenset(flags))
    assert (f.native_bf16, f.vnni, f.avx512) == (bf16, vnni, avx512)
    assert (", native bf16" in f.describe() or "(native bf16" in f.describe()) == bf16


def test_this_machine_reports_known_flags_only():
    assert cpu.cpu_features().flags <= set(cpu.FLAGS)


def test_bf16_training_warns_where_bf16_is_emulated(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "cpu_features", lambda: CpuFeatures(model="AMD EPYC", flags=frozenset({"avx2"})))
    with caplog.at_level(logging.WARNING, logger="fpt_deploy.cpu"):
        assert cpu.warn_if_bf16_emulated("cpu")
    assert "emulated" in caplog.text and "without --bf16" in caplog.text
    assert not cpu.warn_if_bf16_emulated("cuda")  # GPUs have their own bf16 units
    monkeypatch.setattr(cpu, "cpu_features", lambda: CpuFeatures(model="Xeon", flags=frozenset({"amx_bf16"})))
    assert not cpu.warn_if_bf16_emulated("cpu")
