"""`slimdeploy doctor`: which runtimes, providers and devices are usable here, and the fix for each that is not."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_torch() -> list[Check]:
    import torch

    out = [Check("torch", True, f"{torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda
                                                           else ", CPU build"))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            bf16 = "native bf16" if major >= 8 else "bf16 emulated (pre-Ampere): training uses fp32"
            out.append(Check(f"cuda:{i}", True, f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}, {bf16}"))
    else:
        out.append(Check("CUDA GPU", False, "none visible to torch",
                         "GPU paths (torch on cuda, ort-cuda, trt) need an NVIDIA GPU, its driver and a CUDA build "
                         "of torch"))
    return out


def check_onnxruntime() -> list[Check]:
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    if cpu and gpu:
        return [Check("onnxruntime", False, f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed: they "
                      "share one module and the last installed wins, silently",
                      "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'slimdeploy[gpu]' (or [cpu])")]
    if not (cpu or gpu):
        return [Check("onnxruntime", False, "not installed",
                      "pip install 'slimdeploy[cpu]' (CPU) or 'slimdeploy[gpu]' (CUDA)")]
    import onnxruntime as ort

    providers = ort.get_available_providers()
    out = [Check("onnxruntime", True, f"{'onnxruntime-gpu' if gpu else 'onnxruntime'} {cpu or gpu}, providers "
                 f"{', '.join(providers)}")]
    if "CUDAExecutionProvider" in providers:
        from .errors import SlimError
        from .latency.backends import get_backend

        try:
            be = get_backend("ort-cuda")
            be.session(_tiny_onnx())
            out.append(Check("ort-cuda", True, "the CUDA provider loads and runs"))
        except SlimError as e:
            out.append(Check("ort-cuda", False, str(e), "install the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu "
                             "wants (pip install 'onnxruntime-gpu[cuda,cudnn]'), then check nvidia-smi"))
    elif gpu:
        out.append(Check("ort-cuda", False, "onnxruntime-gpu lists no CUDA provider",
                         "check the CUDA driver (nvidia-smi) and the CUDA/cuDNN libraries"))
    return out


def _tiny_onnx() -> bytes:
    import torch

    from .export import onnx_bytes

    return onnx_bytes(torch.nn.Linear(4, 4), torch.randn(1, 4))


def check_tensorrt() -> list[Check]:
    from .trt import tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    version = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13")
    if reason is None:
        return [Check("tensorrt", True, f"{version}, a CUDA GPU visible")]
    return [Check("tensorrt", False, reason, "pip install 'slimdeploy[trt]' --extra-index-url "
                  "https://pypi.nvidia.com (on a machine with an NVIDIA GPU)")]


def check_packages() -> list[Check]:
    out = []
    for dist in ("polygraphy", "timm", "onnx", "onnxslim"):
        v = _version(dist)
        out.append(Check(dist, v is not None, v or "not installed", "" if v else "pip install -e .  (its "
                         "dependencies)"))
    return out


def check_data() -> list[Check]:
    from .data import find_fashion_mnist
    from .errors import SlimError

    try:
        return [Check("fashion-mnist", True, str(find_fashion_mnist()))]
    except SlimError as e:
        return [Check("fashion-mnist", False, str(e), "make setup")]


def check_profiles() -> list[Check]:
    from .latency.backends import get_backend
    from .latency.fingerprint import describe, fingerprint_key
    from .latency.model import user_profiles_dir

    try:
        fp = get_backend("ort-cpu").fingerprint()
    except Exception as e:  # noqa: BLE001 - onnxruntime missing is reported above
        return [Check("local profiles", False, str(e))]
    key = fingerprint_key(fp)
    paths = sorted(user_profiles_dir().glob(f"local-ort-cpu-{key}-*.json"))
    cached = [p.name for p in paths]
    detail = f"this machine: {describe(fp)}; cached: {', '.join(cached) or 'none (measured on first use)'}"
    return [Check("local profiles", True, detail), *filter(None, map(_busy_profile, paths))]


def _busy_profile(path) -> Check | None:
    """A failed check for a cached profile measured on a busy machine, else None (an unreadable profile is
    refused, with its reason, where it is used)."""
    from .errors import SlimError
    from .latency.model import LatencyModel, busy_measurement

    try:
        busy = busy_measurement(LatencyModel.load(str(path)).profile)  # its fit as loaded: refitted if older
    except SlimError:
        return None
    return busy and Check(f"profile {path.name}", False, f"measured on a busy machine ({busy})",
                             f"when the machine is quiet, delete {path} (the next run measures it again) or measure "
                             "it again with slimdeploy profile --device local --model ...")


def run_checks() -> list[Check]:
    return (check_torch() + check_onnxruntime() + check_tensorrt() + check_packages() + check_data()
            + check_profiles())
