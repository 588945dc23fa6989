"""`python -m trainer.checkpoint list URL` and `python -m trainer.checkpoint export URL [--step N]
--to DIR`. The endpoint and credentials come from the standard AWS sources or `-o key=value`
(fsspec storage options, as `checkpoint.storage_options` takes them)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trainer.checkpoint.manifest as mf
from trainer.checkpoint.storage import one_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.checkpoint",
                                     description="List and export ultramesh checkpoints.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", help="checkpoint directory (checkpoint.dir): path or fsspec URL")
    common.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a storage option, e.g. endpoint_url=http://127.0.0.1:9000")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", parents=[common], help="steps, committed, size, mesh, "
                             "checksums")
    listing.add_argument("--no-verify", action="store_true", help="skip reading every file")
    export = sub.add_parser("export", parents=[common],
                            help="Hugging Face safetensors (sharded, with an index) + config.json")
    export.add_argument("--step", type=int, help="the step to export (default: the newest "
                        "committed one)")
    export.add_argument("--to", required=True, help="output directory: path or fsspec URL")
    export.add_argument("--max-shard-size", type=byte_size, default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB (the default, as transformers), "
                        "500MB")
    export.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                        help="the exported weights' dtype (default: as the checkpoint stores "
                        "them)")
    return parser


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def byte_size(text: str) -> int:
    """"5GB", "500MB", "64MiB" or a plain number of bytes."""
    number = text.rstrip("BbIiKkMmGg")
    unit = text[len(number):].upper() or "B"
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 5GB, 500MB or 64MiB") from None


def storage_options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value) if value else ""
    return options


def list_checkpoints(url: str, options: dict[str, Any], *, verify: bool) -> list[str]:
    lines = [f"{'step':>10}  {'committed':9}  {'checksums':9}  {'size':>10}  {'world':>5}  mesh"]
    for found in mf.scan(url, options):
        m = found.manifest
        if m is None:
            lines.append(f"{found.step:>10}  {'no':9}  {'-':9}  {'-':>10}  {'-':>5}  -")
            continue
        checks = "-"
        if verify:
            problems = mf.verify(found.url, m, options)
            checks = "ok" if not problems else "BAD"
        mesh = " x ".join(f"{k}={v}" for k, v in m.mesh.items() if v != 1) or "1 rank"
        lines.append(f"{found.step:>10}  {'yes':9}  {checks:9}  {_size(m.nbytes):>10}  "
                     f"{m.world_size:>5}  {mesh}")
        if verify and checks == "BAD":
            lines.extend(f"{'':12}{p}" for p in problems)
    return lines


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return str(nbytes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = storage_options(args.option)
        if args.command == "list":
            lines = list_checkpoints(args.url, options, verify=not args.no_verify)
            print("\n".join(lines))
            return 0 if len(lines) > 1 else 1
        from trainer.checkpoint.export import ExportError, export

        try:
            exported = export(args.url, args.step, args.to, options,
                              max_shard_bytes=args.max_shard_size, dtype=args.dtype)
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"exported {exported} to {args.to}")
        return 0
    except (OSError, ValueError) as exc:
        print(f"error: {args.url}: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
