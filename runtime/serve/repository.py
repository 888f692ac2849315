"""Write a Triton model repository holding the Python-backend model ``hms``.

Layout (``REPO``)::

    REPO/hms/config.pbtxt        inputs/outputs, max_batch_size, dynamic_batching,
                                 instance_group, parameters (engines_dir, engine, ...)
    REPO/hms/1/model.py          imports TritonPythonModel from hms_deploy
    REPO/hms/1/engines/          a copy of the export (unless engines_dir is kept absolute)
    REPO/launch.sh               runs this machine's tritonserver on REPO (see launch.py)

The model needs ``hms_deploy`` (and its dependencies) importable by the Python that
runs the backend stub: in NVIDIA's container, ``pip install hms-deploy`` there.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from hms_deploy.errors import ConfigError
from hms_deploy.runtime.serve import ENGINES_DIR, MODEL_NAME
from hms_deploy.runtime.serve.options import RepositoryOptions

MODEL_PY = '''"""Triton Python-backend model "hms", written by hms-deploy: the runtime behind Triton.

Needs hms_deploy importable by the backend's Python (pip install hms-deploy there).
"""
from hms_deploy.runtime.serve.triton_model import TritonPythonModel  # noqa: F401
'''

LAUNCH_SH = '''#!/bin/sh
# Serve this repository with the tritonserver of the nvidia-pytriton wheel (or
# $HMS_TRITONSERVER) on loopback; options: --host --http-port --grpc-port --metrics-port.
# In NVIDIA's Triton container run `tritonserver --model-repository DIR` instead.
exec "${{PYTHON:-{python}}}" -m hms_deploy.runtime.serve.launch "$(dirname "$0")" "$@"
'''


def _tensor(name: str, dtype: str, optional: bool) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ]{opt} }}'


def config_pbtxt(engines_dir: str, o: RepositoryOptions) -> str:
    """The model configuration (protobuf text format)."""
    inputs = [("video", "TYPE_STRING"), ("path", "TYPE_STRING"), ("policy", "TYPE_STRING"),
              ("budget_gflops", "TYPE_FP64"), ("name", "TYPE_STRING")]
    outputs = [("record", "TYPE_STRING"), ("label", "TYPE_STRING"), ("score", "TYPE_FP32")]
    params = o.to_params(engines_dir)
    # on a GPU Triton places one instance per GPU and tells it model_instance_device_id
    kind = "KIND_GPU" if o.device.startswith("cuda") else "KIND_CPU"
    lines = [
        f'name: "{MODEL_NAME}"',
        'backend: "python"',
        f"max_batch_size: {o.max_batch}",
        "input [",
        ",\n".join(_tensor(n, t, True) for n, t in inputs),
        "]",
        "output [",
        ",\n".join(_tensor(n, t, False) for n, t in outputs),
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {o.max_queue_delay_us} }}",
        f"instance_group [ {{ count: {o.instances} kind: {kind} }} ]",
        "parameters [",
        ",\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                   for k, v in params.items()),
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_repository(
    repo: str | Path,
    engines_dir: str | Path,
    options: RepositoryOptions | None = None,
    *,
    copy_engines: bool = True,
    force: bool = False,
) -> Path:
    """Write the repository; returns ``REPO``. The export is verified (hashes) first.

    ``copy_engines``: copy the export into ``hms/1/engines`` (a self-contained repository
    to mount into a container); else ``engines_dir`` is referenced by absolute path.
    """

    o = options or RepositoryOptions()
    o.check()
    src = Path(engines_dir)
    _verify_export(src)
    repo = Path(repo)
    if repo.exists() and any(repo.iterdir()):
        if not force:
            raise ConfigError(f"Triton repository '{repo}' exists and is not empty (force "
                              "replaces it)", setting="force", value=str(repo))
        shutil.rmtree(repo)
    version = repo / MODEL_NAME / "1"
    version.mkdir(parents=True)
    if copy_engines:
        shutil.copytree(src, version / ENGINES_DIR,
                        ignore=shutil.ignore_patterns("ort_trt_cache", "*.tmp"))
        where = ENGINES_DIR
    else:
        where = str(src.resolve())
    (repo / MODEL_NAME / "config.pbtxt").write_text(config_pbtxt(where, o))
    (version / "model.py").write_text(MODEL_PY)
    launch = repo / "launch.sh"
    launch.write_text(LAUNCH_SH.format(python=shlex.quote(sys.executable)))
    launch.chmod(0o755)
    return repo


def _verify_export(src: Path) -> None:
    from hms_deploy.runtime.engines import open_engine_set

    if not src.is_dir():
        raise ConfigError(f"engines directory '{src}' not found")
    open_engine_set("onnx", engines_dir=src, device="cpu")  # verifies the manifest's hashes
