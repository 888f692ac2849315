"""Dataset lists: the ``path,label`` CSV that ``hms-extract`` reads, and adapters that
write one from ActivityNet v1.3 and FCVID annotations.

CSV format: a header row naming at least the columns ``path`` and ``label`` (any order,
extra columns ignored), then one video per row. A relative ``path`` resolves against the
CSV's folder. The row's *key* (how the feature store names the video) is the path
string exactly as written in the CSV.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hms_deploy.errors import DatasetError, first_line

REQUIRED_COLUMNS = ("path", "label")
# the video file names a directory scan and a dataset adapter look for (lower case; the
# adapters try them in this order)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".3gp", ".mpg",
                    ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".ogv")


@dataclass(frozen=True)
class ListEntry:
    """One data row of a dataset CSV.

    Attributes:
        line: 1-based line number in the CSV (the header is line 1).
        key: the ``path`` field as written (the video's name in a feature store).
        path: ``key`` resolved against the CSV's folder.
        label: the class name.
    """

    line: int
    key: str
    path: Path
    label: str


@dataclass(frozen=True)
class RowProblem:
    """A data row that cannot be used (it is reported, the other rows still run)."""

    line: int
    key: str
    error: str


@dataclass(frozen=True)
class DatasetList:
    entries: list[ListEntry]
    problems: list[RowProblem]
    source: Path


def read_list(path: str | os.PathLike[str]) -> DatasetList:
    """Read a ``path,label`` CSV.

    Raises :class:`DatasetError` (one line) when the file is missing, empty or lacks a
    required column. Row-level problems (an empty path or label, a duplicate path) are
    returned in :attr:`DatasetList.problems` so that the good rows still run.
    """
    src = Path(path)
    if not src.is_file():
        raise DatasetError(f"{src}: dataset list not found")
    try:
        with src.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{src}: not a readable CSV ({e})") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DatasetError(f"{src}: empty file, expected a header 'path,label'")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{src}: missing column {', '.join(repr(m) for m in missing)} "
            f"(header has: {', '.join(rows[0]) or 'nothing'}); expected a header 'path,label'"
        )
    ip, il = header.index("path"), header.index("label")
    base = src.parent
    entries: list[ListEntry] = []
    problems: list[RowProblem] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue  # blank line
        key = row[ip].strip() if ip < len(row) else ""
        label = row[il].strip() if il < len(row) else ""
        if not key:
            problems.append(RowProblem(line, key, f"line {line}: empty path"))
            continue
        if not label:
            problems.append(RowProblem(line, key, f"{key}: line {line}: empty label"))
            continue
        if key in seen:
            problems.append(
                RowProblem(line, key, f"{key}: line {line}: duplicate of line {seen[key]}")
            )
            continue
        seen[key] = line
        p = Path(key).expanduser()
        entries.append(ListEntry(line, key, p if p.is_absolute() else base / p, label))
    return DatasetList(entries, problems, src)


def write_list(path: str | os.PathLike[str], rows: Iterable[tuple[str, str]]) -> Path:
    """Write ``(path, label)`` rows with the header ``path,label``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REQUIRED_COLUMNS)
        w.writerows(rows)
    return out


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive (Windows)
        return str(path)


# ------------------------------------------------------------------------- ActivityNet


@dataclass(frozen=True)
class AdapterReport:
    """What an adapter wrote: rows, classes, and what it skipped (counts by reason)."""

    csv: Path
    labels: Path
    rows: int
    classes: int
    skipped: dict[str, int]


def _find_video(video_dir: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        for ext in ("",) + VIDEO_EXTENSIONS:
            p = video_dir / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def activitynet_to_csv(
    annotations: str | os.PathLike[str],
    video_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    subset: str = "training",
    labels_out: str | os.PathLike[str] | None = None,
    require_files: bool = True,
) -> AdapterReport:
    """ActivityNet v1.3 JSON -> ``path,label`` CSV (+ ``labels.txt``).

    The JSON is ``{"database": {video_id: {"subset": "training"|"validation"|"testing",
    "annotations": [{"label": name, "segment": [s, e]}, ...], ...}}, ...}``. A video file
    is looked up in ``video_dir`` as ``v_<id>.<ext>`` (the downloader's naming) or
    ``<id>.<ext>``. The video's label is its most frequent annotation label (ActivityNet
    v1.3 videos carry one class; rows with several are counted under
    ``skipped["multi_label_first_kept"]`` and keep the most frequent). The class list
    (``labels_out``, default ``labels.txt`` beside the CSV) is every label in the
    database, sorted, so that class indices agree between subsets. Videos without
    annotations (the test subset) or without a file (with ``require_files``) are skipped
    and counted.
    """
    src = Path(annotations)
    try:
        db = json.loads(src.read_text())["database"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{src}: not an ActivityNet JSON with a 'database' ({e})") from None
    vdir, out = Path(video_dir), Path(out_csv)
    all_labels = sorted(
        {a["label"] for v in db.values() for a in v.get("annotations", []) if "label" in a}
    )
    rows: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    for vid, v in sorted(db.items()):
        if v.get("subset") != subset:
            continue
        names = [a["label"] for a in v.get("annotations", []) if "label" in a]
        if not names:
            skipped["no_annotation"] += 1
            continue
        counts = Counter(names)
        if len(counts) > 1:
            skipped["multi_label_first_kept"] += 1
        label = counts.most_common(1)[0][0]
        found = _find_video(vdir, (f"v_{vid}", vid))
        if found is None:
            if require_files:
                skipped["missing_file"] += 1
                continue
            found = vdir / f"v_{vid}.mp4"
        rows.append((_relative(found, out.parent), label))
    write_list(out, rows)
    lab = Path(labels_out) if labels_out else out.parent / "labels.txt"
    lab.write_text("".join(f"{c}\n" for c in all_labels))
    return AdapterReport(out, lab, len(rows), len(all_labels), dict(skipped))


# ------------------------------------------------------------------------------- FCVID


def fcvid_to_csv(
    split_file: str | os.PathLike[str],
    label_file: str | os.PathLike[str],
    video_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    subset: str = "train",
    categories: str | os.PathLike[str] | None = None,
    labels_out: str | os.PathLike[str] | None = None,
    require_files: bool = True,
) -> AdapterReport:
    """FCVID release files -> ``path,label`` CSV (+ ``labels.txt``).

    Format assumed (the FCVID release's ``materials/`` folder, as read by AdaFrame-style
    loaders):

    - ``FCVID_VideoName_TrainTestSplit.txt``: one video a line, ``<relative path> <train|test>``
      separated by whitespace (e.g. ``making_cake/abc.mp4 train``);
    - ``FCVID_Label.txt``: one row per line of the split file, in the same order, of C
      whitespace-separated 0/1 values (C = 239);
    - ``categories`` (optional): one class name a line, C lines, in column order
      (e.g. the first column of ``FCVID_Category.txt``); without it classes are named
      ``class_000`` .. ``class_238``.

    Paths resolve against ``video_dir``. A row with several positive classes keeps the
    first (counted under ``skipped["multi_label_first_kept"]``); rows without a positive
    or without a file (with ``require_files``) are skipped and counted.
    """
    sp, lp = Path(split_file), Path(label_file)
    for p in (sp, lp):
        if not p.is_file():
            raise DatasetError(f"{p}: FCVID file not found")
    split = [ln.split() for ln in sp.read_text().splitlines() if ln.strip()]
    label_rows = [ln.split() for ln in lp.read_text().splitlines() if ln.strip()]
    if len(split) != len(label_rows):
        raise DatasetError(
            f"{lp}: {len(label_rows)} label rows, expected {len(split)} (one per line of {sp})"
        )
    if any(len(r) < 2 for r in split):
        bad = next(i for i, r in enumerate(split) if len(r) < 2) + 1
        raise DatasetError(f"{sp}: line {bad}: expected '<path> <train|test>'")
    n_classes = len(label_rows[0]) if label_rows else 0
    if categories is not None:
        names = [ln.split()[0] if ln.split() else "" for ln in Path(categories).read_text().splitlines()]
        names = [n for n in names if n]
        if len(names) != n_classes:
            raise DatasetError(f"{categories}: {len(names)} classes, expected {n_classes}")
    else:
        names = [f"class_{k:03d}" for k in range(n_classes)]
    vdir, out = Path(video_dir), Path(out_csv)
    rows: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    for i, (parts, lab) in enumerate(zip(split, label_rows), start=1):
        if parts[1] != subset:
            continue
        if len(lab) != n_classes:
            raise DatasetError(f"{lp}: line {i} has {len(lab)} values, expected {n_classes}")
        pos = [k for k, v in enumerate(lab) if float(v) > 0.5]
        if not pos:
            skipped["no_label"] += 1
            continue
        if len(pos) > 1:
            skipped["multi_label_first_kept"] += 1
        video = vdir / parts[0]
        if require_files and not video.is_file():
            skipped["missing_file"] += 1
            continue
        rows.append((_relative(video, out.parent), names[pos[0]]))
    write_list(out, rows)
    labp = Path(labels_out) if labels_out else out.parent / "labels.txt"
    labp.write_text("".join(f"{c}\n" for c in names))
    return AdapterReport(out, labp, len(rows), n_classes, dict(skipped))


def main(argv: list[str] | None = None) -> int:
    """``python -m hms_deploy.data.datasets {activitynet,fcvid} ...``: write a dataset CSV."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m hms_deploy.data.datasets",
                                 description="Write a path,label CSV for hms-extract.")
    sub = ap.add_subparsers(dest="dataset", required=True)
    a = sub.add_parser("activitynet", help="ActivityNet v1.3 JSON")
    a.add_argument("annotations")
    a.add_argument("video_dir")
    a.add_argument("out_csv")
    a.add_argument("--subset", default="training", help="training | validation")
    a.add_argument("--labels-out", default=None)
    a.add_argument("--keep-missing", action="store_true", help="list videos without a file")
    f = sub.add_parser("fcvid", help="FCVID split + label files")
    f.add_argument("split_file", help="FCVID_VideoName_TrainTestSplit.txt")
    f.add_argument("label_file", help="FCVID_Label.txt")
    f.add_argument("video_dir")
    f.add_argument("out_csv")
    f.add_argument("--subset", default="train", help="train | test")
    f.add_argument("--categories", default=None, help="one class name a line, column order")
    f.add_argument("--labels-out", default=None)
    f.add_argument("--keep-missing", action="store_true", help="list videos without a file")
    args = ap.parse_args(argv)
    try:
        if args.dataset == "activitynet":
            rep = activitynet_to_csv(args.annotations, args.video_dir, args.out_csv,
                                     subset=args.subset, labels_out=args.labels_out,
                                     require_files=not args.keep_missing)
        else:
            rep = fcvid_to_csv(args.split_file, args.label_file, args.video_dir, args.out_csv,
                               subset=args.subset, categories=args.categories,
                               labels_out=args.labels_out, require_files=not args.keep_missing)
    except (DatasetError, OSError) as e:
        print(f"{ap.prog}: error: {first_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {rep.csv} ({rep.rows} videos, {rep.classes} classes in {rep.labels}); "
          f"skipped: {rep.skipped or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
