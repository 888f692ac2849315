"""Online serving on Triton Inference Server.

- :mod:`~hms_deploy.runtime.serve.handler`: requests -> records; validation of every input
  (one-line errors per request), uploads and ``--allowed-root`` paths, and the lockstep
  batching of a dynamic batch through :class:`~hms_deploy.runtime.session.Session`.
- :mod:`~hms_deploy.runtime.serve.triton_model`: the Python-backend model ``hms``
  (``TritonPythonModel``) over the handler.
- :mod:`~hms_deploy.runtime.serve.repository`: writes a Triton model repository.
- :mod:`~hms_deploy.runtime.serve.launch`: runs ``tritonserver`` on a repository (the
  binary, backend directory and environment it needs), bound to one host address.
- :mod:`~hms_deploy.runtime.serve.health`: watches the model in a running server and
  reloads it when its backend stub died.
- :mod:`~hms_deploy.runtime.serve.metrics`: the model's counters on Triton's metrics port.

Nothing here imports Triton at module level: ``triton_python_backend_utils`` exists only
inside the backend's stub process.
"""

MODEL_NAME = "hms"
ENGINES_DIR = "engines"  # a repository's copy of the export, in the model's version folder
INPUTS = ("video", "path", "policy", "budget_gflops", "name")
OUTPUTS = ("record", "label", "score")
