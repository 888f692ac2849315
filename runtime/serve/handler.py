"""Serving requests -> ``hms-run --json`` records, one error line per bad request.

A *request* is a dict of input name -> numpy array (or None when absent), as Triton
hands them over: leading axis = rows of that request (a client normally sends one row):

- ``video`` (BYTES): the file's bytes, at most ``max_upload_bytes``; or
- ``path`` (BYTES): a path on the server, relative to or inside ``allowed_root``
  (``..`` and symlinks that leave it are refused; no root = path inputs disabled);
- ``policy`` (BYTES, optional, default ``learned``), ``budget_gflops`` (FP64, optional;
  <= 0 or NaN = no budget), ``name`` (BYTES, optional: the record's ``video`` field for
  an upload, default ``upload``).

:meth:`Handler.run` answers a dynamic batch: every request gets either its outputs
(``record`` = the JSON record, ``label``, ``score``; one row per input row) or one line
of error text. Valid rows with the same options are stepped in lockstep (one
:meth:`Session.classify_many` batch, the scheduler's N > 1 path), so concurrent
requests share backbone calls; a row that fails only fails its own request (the
Session reruns the batch's other videos one by one).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import ConfigError, HMSError
from hms_deploy.runtime.options import RunSettings
from hms_deploy.runtime.results import record_json
from hms_deploy.runtime.serve.options import RepositoryOptions
from hms_deploy.runtime.session import Session

INTERNAL_PREFIX = "internal error"  # answers that are the server's fault, not the request's

Request = dict[str, "NDArray[np.generic] | None"]  # Triton's arrays (BYTES are object arrays)
Outputs = dict[str, NDArray[np.generic]]


class RequestError(HMSError):
    """A request that cannot be served; the message is the one line the client gets."""


@dataclass
class _Row:
    request: int  # index of the request in the batch
    row: int  # index of the row in its request
    file: str  # what the runtime opens
    shown: str  # the record's "video" field
    key: tuple[str, float | None]  # (policy, budget)


@dataclass
class _Answer:
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def _text(value: Any, what: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{what}' is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"input '{what}' must be BYTES (a string), got {type(value).__name__}")


def _rows(arr: NDArray[np.generic] | None, n: int | None, what: str) -> list[Any] | None:
    """One element per row (arrays of shape (k,) or (k, 1)); None if the input is absent."""
    if arr is None:
        return None
    a = np.asarray(arr, dtype=object)
    if a.ndim == 0:
        a = a.reshape(1)
    a = a.reshape(a.shape[0], -1)
    if a.shape[1] != 1:
        raise RequestError(f"input '{what}' has shape {tuple(np.shape(arr))}, expected (N, 1)")
    if n is not None and a.shape[0] != n:
        raise RequestError(f"input '{what}' has {a.shape[0]} row(s), the request has {n}")
    return list(a[:, 0])


def resolve_path(text: str, root: Path | None) -> Path:
    """The file ``text`` names under ``root`` (symlinks resolved); RequestError if outside."""
    if root is None:
        raise RequestError("input 'path' is disabled on this server (no allowed root: the "
                           "server's allowed root, or the model's allowed_root parameter)")
    if not text or "\x00" in text:
        raise RequestError("input 'path' is empty or holds a NUL byte")
    if ".." in Path(text).parts:
        raise RequestError(f"path '{text}' contains '..': refused")
    real_root = Path(os.path.realpath(root))
    candidate = Path(text) if os.path.isabs(text) else real_root / text
    real = Path(os.path.realpath(candidate))
    if real != real_root and real_root not in real.parents:
        raise RequestError(f"path '{text}' is outside the allowed root: refused")
    if not real.is_file():
        raise RequestError(f"path '{text}' is not a file under the allowed root")
    return real


class Handler:
    """Answers dynamic batches of requests with one open :class:`Session`."""

    def __init__(self, session: Session, options: RepositoryOptions | None = None):
        self.session = session
        self.options = options or RepositoryOptions()
        self._opts: dict[tuple[str, float | None], RunSettings] = {}

    # -- parsing -------------------------------------------------------------------------
    def run_options(self, policy: str, budget: float | None) -> RunSettings:
        key = (policy, budget)
        if key not in self._opts:
            try:
                self._opts[key] = self.session.options(self.options.run, policy=policy,
                                                       budget=budget)
            except ConfigError as e:
                raise RequestError(str(e)) from None
            if len(self._opts) > 256:  # clients choose the keys: keep the cache bounded
                self._opts.pop(next(iter(self._opts)))
        return self._opts[key]

    def _parse(self, index: int, req: Request, tmp: Path) -> list[_Row]:
        unknown = sorted(k for k, v in req.items() if v is not None and k not in
                         ("video", "path", "policy", "budget_gflops", "name"))
        if unknown:
            raise RequestError(f"unknown input(s) {', '.join(unknown)}")
        videos = _rows(req.get("video"), None, "video")
        paths = _rows(req.get("path"), None, "path")
        if videos is not None and paths is not None:
            raise RequestError("give one of the inputs 'video' (file bytes) or 'path', not both")
        if videos is None and paths is None:
            raise RequestError("missing input: give 'video' (file bytes) or 'path' (a file on the server)")
        items = videos if videos is not None else paths
        assert items is not None
        n = len(items)
        policies = _rows(req.get("policy"), n, "policy") or ["learned"] * n
        budgets = _rows(req.get("budget_gflops"), n, "budget_gflops") or [None] * n
        names = _rows(req.get("name"), n, "name") or ["upload"] * n
        rows = []
        for j, item in enumerate(items):
            policy = _text(policies[j], "policy").strip() or "learned"
            budget = budgets[j]
            if budget is not None:
                try:
                    budget = float(budget)
                except (TypeError, ValueError):
                    raise RequestError("input 'budget_gflops' must be a number (FP64)") from None
                if math.isnan(budget) or budget <= 0:
                    budget = None
            self.run_options(policy, budget)  # validates: one line if bad
            if videos is not None:
                if not isinstance(item, (bytes, np.bytes_)):
                    raise RequestError("input 'video' must be BYTES (the file's contents)")
                data = item  # np.bytes_ is bytes: written as is, not copied first
                if not data:
                    raise RequestError("input 'video' is empty (0 bytes)")
                limit = self.options.max_upload_bytes
                if len(data) > limit:
                    raise RequestError(
                        f"upload of {len(data) / 2**20:.1f} MiB exceeds this server's limit "
                        f"of {limit / 2**20:.1f} MiB"
                    )
                shown = _text(names[j], "name") or "upload"
                suffix = Path(shown).suffix
                suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""
                f = tmp / f"r{index}-{j}{suffix}"
                f.write_bytes(data)
                rows.append(_Row(index, j, str(f), shown, (policy, budget)))
            else:
                text = _text(item, "path")
                real = resolve_path(text, self.options.allowed_root)
                rows.append(_Row(index, j, str(real), text, (policy, budget)))
        return rows

    # -- answering -----------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> list[Outputs | str]:
        """Outputs (or one line of error text) for every request, in order."""
        return [a if isinstance(a, str) else outputs(a) for a in self.answer(requests)]

    def answer(self, requests: Sequence[Request]) -> list[list[dict[str, Any]] | str]:
        """The records (or one line of error text) of every request, in order."""
        answers = [_Answer() for _ in requests]
        tmp = Path(tempfile.mkdtemp(prefix=f"hms-serve-{os.getpid()}-", dir=self.options.upload_dir))
        try:
            groups: dict[tuple[str, float | None], list[_Row]] = {}
            for i, req in enumerate(requests):
                try:
                    for row in self._parse(i, req, tmp):
                        groups.setdefault(row.key, []).append(row)
                except RequestError as e:
                    answers[i].error = str(e)
                except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
                    answers[i].error = f"{INTERNAL_PREFIX} ({type(e).__name__}: {e})"
            for key, rows in groups.items():
                # no probe first: the lockstep run opens every video anyway, and when one
                # fails the Session reruns the others one by one (each still answered)
                rows = [r for r in rows if answers[r.request].error is None]
                if not rows:
                    continue
                try:
                    recs = list(self.session.classify_many(
                        [r.file for r in rows], options=self.run_options(*key), batch_size=len(rows)
                    ))
                except Exception as e:  # noqa: BLE001 - the server answers, whatever broke
                    recs = [{"error": f"{INTERNAL_PREFIX} ({type(e).__name__}: {e})"}] * len(rows)
                for row, rec in zip(rows, recs):
                    ans = answers[row.request]
                    if "error" in rec:
                        ans.error = ans.error or rec["error"].replace(row.file, row.shown)
                    else:
                        rec["video"] = row.shown
                        ans.records[row.row] = rec
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [" ".join(a.error.split()) if a.error is not None
                else [a.records[j] for j in sorted(a.records)] for a in answers]


def outputs(records: list[dict[str, Any]]) -> Outputs:
    """The model's outputs for the records of one request: (k, 1) arrays."""
    return {
        "record": np.array([[record_json(r).encode()] for r in records], dtype=object),
        "label": np.array([[str(r["label"]).encode()] for r in records], dtype=object),
        "score": np.array([[r["score"]] for r in records], dtype=np.float32),
    }
