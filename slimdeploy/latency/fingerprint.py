"""Hardware fingerprints: what a latency profile is valid for.

CPU: model name, core count, the ISA flags that change kernel choice (AVX2, AVX-512 and its VNNI/BF16/FP16
extensions, AMX), thread count, and the runtime with its version. GPU: name, driver, CUDA and TensorRT
versions. A profile records the fingerprint it was measured on; using it on a machine whose fingerprint
differs gets a warning naming both (latency tables do not transfer between machines).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

# ISA flags (as /proc/cpuinfo names them) that change which kernels a runtime picks
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "sve2")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if info:
                    break
                continue
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_name() -> str:
    """Human-readable: 'Intel(R) Xeon(R) Processor (2 cores)'."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def cpu_fingerprint(runtime: str, runtime_version: str, threads: int | None) -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {"kind": "cpu", "model": cpu_model(), "cores": os.cpu_count(),
            "isa": sorted(f for f in ISA_FLAGS if f in flags), "threads": threads, "runtime": runtime,
            "runtime_version": runtime_version}


def gpu_fingerprint(runtime: str, runtime_version: str, device_index: int = 0) -> dict:
    import torch

    name = torch.cuda.get_device_name(device_index) if torch.cuda.is_available() else "no CUDA device"
    driver = None
    try:  # the driver version, where NVML's python bindings are installed
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - optional: absent bindings or no driver
        pass
    trt_version = None
    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:
        pass
    return {"kind": "gpu", "model": name, "driver": driver, "cuda": torch.version.cuda, "tensorrt": trt_version,
            "runtime": runtime, "runtime_version": runtime_version}


def fingerprint_key(fp: dict) -> str:
    """A short stable hash of a fingerprint (names cached local profiles)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]


def describe(fp: dict) -> str:
    if not fp:
        return "an unrecorded machine"
    if fp.get("kind") == "gpu":
        return (f"{fp.get('model')} (driver {fp.get('driver')}, CUDA {fp.get('cuda')}, TensorRT {fp.get('tensorrt')}, "
                f"{fp.get('runtime')} {fp.get('runtime_version')})")
    isa = "/".join(fp.get("isa") or []) or "no listed ISA flags"
    return (f"{fp.get('model')} ({fp.get('cores')} cores, {fp.get('threads')} thread(s), {isa}, "
            f"{fp.get('runtime')} {fp.get('runtime_version')})")


def differences(recorded: dict, here: dict) -> list[str]:
    """The fields in which two fingerprints differ ('' entries ignored)."""
    keys = sorted(set(recorded) | set(here))
    return [k for k in keys if recorded.get(k) != here.get(k)]
