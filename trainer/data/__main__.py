"""`python -m trainer.data prepare|info`: make and inspect token shard datasets.

Imports neither torch nor Lightning, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator

import fsspec

from trainer.data.format import BYTES_SEPARATOR, INDEX_FILE, DataError, read_index
from trainer.data.inputs import FORMATS, ReadOptions
from trainer.data.writer import DEFAULT_SHARD_TOKENS, JOURNAL_FILE, default_workers, prepare

_EPILOG = """\
examples:
  python -m trainer.data prepare --output data/mybooks books/ notes/*.md
  python -m trainer.data prepare --tokenizer hf:my_tokenizer/ --text-field text \\
      --output s3://bucket/c1 corpus.jsonl
  python -m trainer.data prepare --tokenizer tiktoken:llama3.tiktoken --column content \\
      --output data/c2 'crawl/*.parquet'
  python -m trainer.data prepare --tokenizer ids --output s3://bucket/corpus ids/*.npy
  python -m trainer.data info s3://bucket/corpus

Inputs and outputs are paths or fsspec URLs. S3-compatible endpoints and credentials: fsspec reads
FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY, FSSPEC_S3_SECRET (or the usual AWS_* variables).
An interrupted prepare keeps its finished shards: the same command resumes it."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make and inspect token shard datasets for training (data.path=URL).")
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="tokenize text (files, JSONL, Parquet, Hugging Face datasets) into shards",
        description="Tokenize INPUTs into a shard directory, on every core. Byte-level tokens "
                    "by default:\nevery document's bytes, each ended by byte "
                    f"{BYTES_SEPARATOR:#x}.")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="file, directory (searched recursively by suffix), glob pattern or "
                           "fsspec URL of any of them; a save_to_disk directory is one input")
    prep.add_argument("--output", default="tokens", metavar="URL",
                      help="directory or fsspec URL (s3://bucket/prefix) to write (default: "
                           "./tokens); it must not hold a dataset already")
    prep.add_argument("--tokenizer", default="bytes", metavar="NAME",
                      help="bytes (the default): raw UTF-8 bytes; hf:PATH: a Hugging Face "
                           "tokenizer.json or its directory; tiktoken:PATH: a .tiktoken BPE file "
                           "(Llama 3 special tokens); ids: .npy arrays of integer ids, one "
                           "document per file")
    prep.add_argument("--format", dest="fmt", choices=FORMATS, default="auto",
                      help="how to read the inputs (default: auto, by suffix: .txt .md .py text, "
                           ".jsonl jsonl, .parquet parquet, .csv .arrow .json and save_to_disk "
                           "directories datasets, .npy ids)")
    prep.add_argument("--text-field", default="text", metavar="NAME",
                      help="JSONL: the field holding each document's text (default: text)")
    prep.add_argument("--column", default="text", metavar="NAME",
                      help="Parquet and datasets: the column holding the text (default: text)")
    prep.add_argument("--split", default="train", metavar="NAME",
                      help="a saved DatasetDict's split to read (default: train)")
    prep.add_argument("--eod-token", default=None, metavar="TOKEN",
                      help="hf and tiktoken: the token that ends each document (default: the "
                           "tokenizer's eos_token, or <|end_of_text|> for tiktoken)")
    prep.add_argument("--separator", type=int, default=None, metavar="ID",
                      help=f"bytes and ids: the id that ends each document (default: "
                           f"{BYTES_SEPARATOR} for bytes, none for ids)")
    prep.add_argument("--workers", type=int, default=None, metavar="N",
                      help=f"tokenizer processes (default: one per core, {default_workers()} "
                           "here)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                      help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")

    info = commands.add_parser("info", help="print a dataset's size, tokenizer and vocabulary",
                               description="Print the tokens, shards, tokenizer and vocabulary "
                                           "of a dataset.")
    info.add_argument("url", metavar="URL", help="dataset directory or fsspec URL")
    return parser


def _print_info(url: str, index: dict) -> None:
    tokenizer = index["tokenizer"]
    eod = tokenizer["eod_id"]
    documents = index.get("num_documents")
    print(f"dataset:    {url}")
    print(f"tokens:     {index['num_tokens']}")
    print(f"documents:  {'unknown' if documents is None else documents}")
    print(f"shards:     {len(index['shards'])}")
    print(f"vocab_size: {index['vocab_size']}")
    print(f"dtype:      {index['dtype']}")
    print(f"tokenizer:  {tokenizer['name']} (end of document: "
          f"{'none' if eod is None else eod}"
          f"{'' if tokenizer.get('eod_token') is None else ' ' + tokenizer['eod_token']})")
    if tokenizer.get("sha256"):
        print(f"sha256:     {tokenizer['sha256']}")


def _info(url: str) -> None:
    try:
        index = read_index(url)
    except DataError:
        fs, root = fsspec.core.url_to_fs(url)
        journal = f"{root.rstrip('/')}/{JOURNAL_FILE}"
        if fs.exists(journal):
            shards = len(json.loads(fs.cat_file(journal))["shards"])
            raise DataError(f"{url}: an interrupted prepare ({shards} finished shard(s), no "
                            f"{INDEX_FILE}); rerun its command to finish it") from None
        raise
    _print_info(url, index)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's stop) ends prepare the way Ctrl-C does: finished shards stay."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prepare":
            read = ReadOptions(text_field=args.text_field, column=args.column, split=args.split)
            with _sigterm_interrupts():
                index = prepare(args.inputs, args.output, tokenizer=args.tokenizer,
                                fmt=args.fmt, read=read, shard_tokens=args.shard_tokens,
                                separator=args.separator, eod_token=args.eod_token,
                                workers=args.workers)
            _print_info(args.output, index)
        else:
            _info(args.url)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
