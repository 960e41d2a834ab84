"""What this CPU computes natively: the instruction-set features that decide bf16 and int8 speed. Torch-free.

bf16 matrix products run natively only with AVX512_BF16 or AMX-BF16; elsewhere PyTorch emulates them
in fp32 and they run slower than fp32 itself. int8 products are fast with VNNI (AVX512_VNNI or
AVX_VNNI). ``cpu_features`` reads the flags Linux reports (/proc/cpuinfo); the benchmark records
them and skips emulated contenders, and ``fpt-deploy train --bf16`` warns on such a CPU.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True, kw_only=True)
class CpuFeatures:
    model: str  # the CPU's model name
    flags: frozenset[str]  # of FLAGS, the ones this CPU has

    @property
    def native_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    def describe(self) -> str:
        """``model (AVX-512, VNNI, native bf16)``: what a figure measured here should be tied to."""
        has = [n for n, ok in (("AVX-512", self.avx512), ("VNNI", self.vnni), ("native bf16", self.native_bf16)) if ok]
        return f"{self.model} ({', '.join(has) or 'no AVX-512, no VNNI, no native bf16'})"


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU model and the FLAGS it has (none known off Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return CpuFeatures(model=model, flags=frozenset(f for f in FLAGS if f in flags))


def warn_if_bf16_emulated(device_type: str) -> bool:
    """Warn when bf16 autocast is asked for on a CPU that emulates bf16; True when it is emulated."""
    features = cpu_features()
    if device_type != "cpu" or features.native_bf16:
        return False
    log.warning(
        "bf16 on this CPU (%s) is emulated: it has neither AVX512_BF16 nor AMX-BF16, so bf16 autocast runs "
        "slower than fp32; train without --bf16",
        features.model,
    )
    return True
