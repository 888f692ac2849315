"""``hms-inspect DIR``: what an export holds, and whether its files match their hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hms_deploy.cli.common import debug_option, fail, handle_errors


def _io(tensors: list[Any]) -> str:
    return ", ".join(f"{t.name} ({', '.join(['N', *map(str, t.shape)])}) {t.dtype}" for t in tensors)


def _figure(f: dict[str, Any]) -> str:
    if "mismatches" in f:
        return f"{f['mismatches']} mismatches [{f.get('status')}]"
    if "error" in f:
        return f"{f['error']} [{f.get('status')}]"
    return (f"max_abs {f.get('max_abs')}, max_rel {f.get('max_rel')}, cos {f.get('cosine')} "
            f"[{f.get('status')}]")


def _parity_lines(p: dict[str, Any]) -> list[str]:
    if not p:
        return ["  (no parity report)"]
    head = (f"  status: {p.get('status')}  ({p.get('reference')} vs {p.get('candidate')}, "
            f"precision {p.get('precision')}, {p.get('seconds')} s)")
    lines = [head]
    if p.get("note"):
        lines.append(f"  note: {p['note']}")
    if p.get("failure"):
        lines.append(f"  failure: {p['failure']}")
    for name, r in p.get("parts", {}).items():
        for kind in ("random", "realistic"):
            for out, f in r.get(kind, {}).get("outputs", {}).items():
                lines.append(f"  {name:20s} {kind:9s} {out:8s} {_figure(f)}")
    for name, g in p.get("gates", {}).items():
        lines.append(
            f"  {name:20s} decisions: {g.get('agree')}/{g.get('samples')} agree, "
            f"{g.get('ties')} ties, {g.get('disagree_outside_ties')} differ outside ties "
            f"[{g.get('status')}]"
        )
    e = p.get("end_to_end")
    if e:
        lines.append(
            f"  end-to-end: {e.get('video')}, T={e.get('steps')}: decisions equal "
            f"{e.get('decisions_equal')}, usage {e.get('usage')}, top-1 torch {e.get('top1_torch')} "
            f"/ onnx {e.get('top1_onnx')}, probs max_abs {e.get('probs', {}).get('max_abs')} "
            f"[{e.get('status')}]"
        )
    t = p.get("tensorrt")
    if t:
        lines.append(f"  tensorrt vs {t.get('reference')}: {t.get('status')}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print the manifest plus a 'verification' object as JSON.")
@debug_option
@handle_errors("hms-inspect")
def main(directory: Path, as_json: bool, debug: bool) -> None:
    """Show the parts of an export DIR (I/O, GMAC, hashes), producer versions and the stored
    parity report; exit non-zero if any file does not match its sha256."""
    from hms_deploy.runtime.manifest import load_manifest, verify_files

    man = load_manifest(directory, verify=False)
    problems = verify_files(man)
    if as_json:
        out = dict(man.data)
        out["verification"] = {"ok": not problems, "problems": problems,
                               "manifest_sha256": man.sha256}
        click.echo(json.dumps(out, indent=2))
    else:
        d = man.data
        click.echo(f"export {man.dir}  (format {d.get('format_version')}, created {d.get('created')}, "
                   f"manifest sha256 {man.sha256[:16]})")
        cfg = man.config
        click.echo(f"model: {cfg.variant}, {cfg.num_classes} classes, T={man.steps}, "
                   f"precision {man.precision}, labels {man.labels[:5]}"
                   f"{' ...' if len(man.labels) > 5 else ''}")
        prod = man.producer
        click.echo("producer: " + ", ".join(f"{k} {v}" for k, v in prod.items() if v is not None))
        if man.tensorrt:
            t = man.tensorrt
            click.echo(f"tensorrt: {t.get('version')} on {t.get('gpu')} (sm {t.get('compute_capability')}), "
                       f"batch 1..{t.get('max_batch')} (opt {t.get('opt_batch')})")
        bad_files = {p.split(":", 1)[0] for p in problems}
        click.echo("parts:")
        for name, e in man.parts.items():
            click.echo(f"  {name}  {e.gmac:.4g} GMAC/sample  {e.precision}")
            click.echo(f"    in:  {_io(e.inputs)}")
            click.echo(f"    out: {_io(e.outputs)}")
            for kind, rel in e.files.items():
                state = "MISMATCH" if str(man.dir / rel) in bad_files else "ok"
                click.echo(f"    {kind:9s} {rel}  sha256 {e.sha256.get(kind, '')[:16]}  {state}")
            if e.trt:
                prof = ", ".join(f"{k} {v['min'][0]}..{v['max'][0]} (opt {v['opt'][0]})"
                                 for k, v in e.trt.get("profile", {}).items())
                click.echo(f"    plan: TensorRT {e.trt.get('tensorrt_version')}, {e.trt.get('gpu')} "
                           f"(sm {e.trt.get('compute_capability')}), flags {e.trt.get('flags')}, "
                           f"batch {prof}")
        click.echo("parity:")
        for line in _parity_lines(man.parity):
            click.echo(line)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        fail("hms-inspect", problems[0] + more)
