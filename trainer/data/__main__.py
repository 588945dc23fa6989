"""`python -m trainer.data prepare|info`: make and inspect token shard datasets.

Imports neither torch nor Lightning, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.data.format import BYTES_SEPARATOR, TOKENIZERS, DataError, read_index
from trainer.data.writer import DEFAULT_SHARD_TOKENS, prepare

_EPILOG = """\
examples:
  python -m trainer.data prepare --output data/mybooks books/ notes/*.md
  python -m trainer.data prepare --tokenizer ids --output s3://bucket/corpus ids/*.npy
  python -m trainer.data info s3://bucket/corpus

S3-compatible endpoints and credentials: fsspec reads FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY,
FSSPEC_S3_SECRET (or the usual AWS_* variables)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make and inspect token shard datasets for training (data.path=URL).")
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="turn text files (or token id arrays) into shards",
        description="Tokenize INPUTs into a shard directory. Byte-level tokens by default:\n"
                    f"each file's bytes, each document ended by byte {BYTES_SEPARATOR:#x}.")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="file, directory (searched recursively: *.txt *.md *.py for bytes, "
                           "*.npy for ids) or glob pattern")
    prep.add_argument("--output", default="tokens", metavar="URL",
                      help="directory or fsspec URL (s3://bucket/prefix) to write (default: "
                           "./tokens); it must not hold a dataset already")
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                      help="bytes: raw bytes of text files; ids: .npy arrays of integer ids "
                           "from any tokenizer, one document per file (default: bytes)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                      help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    prep.add_argument("--separator", type=int, default=None, metavar="ID",
                      help=f"token id that ends each document (default: {BYTES_SEPARATOR} for "
                           "bytes, none for ids)")

    info = commands.add_parser("info", help="print a dataset's size and vocabulary",
                               description="Print the tokens, shards and vocabulary of a dataset.")
    info.add_argument("url", metavar="URL", help="dataset directory or fsspec URL")
    return parser


def _print_info(url: str, index: dict) -> None:
    separator = index["separator"]
    print(f"dataset:    {url}")
    print(f"tokens:     {index['num_tokens']}")
    print(f"shards:     {len(index['shards'])}")
    print(f"vocab_size: {index['vocab_size']}")
    print(f"dtype:      {index['dtype']}")
    print(f"tokenizer:  {index['tokenizer']} (separator: "
          f"{'none' if separator is None else separator})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prepare":
            index = prepare(args.inputs, args.output, tokenizer=args.tokenizer,
                            shard_tokens=args.shard_tokens, separator=args.separator)
            _print_info(args.output, index)
        else:
            _print_info(args.url, read_index(args.url))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
