"""Throughput of data preparation: MB of UTF-8 text encoded and written as token shards per second.

For the character tokenizer and a byte-level BPE trained on the corpus (bpe:N), it prepares the corpus with
`prepare_shards` (streamed, 1 and 2 worker processes) and, for characters, with `prepare_dataset` (in memory, what
character-level training runs use). BPE training is timed apart: it happens once per run, before encoding.
The corpus is tinyshakespeare (1.1 MB) repeated to --megabytes, one document per copy.

    python bench/prepare_data.py                          # 8 MB, workers 1 and 2, bpe:4096
    python bench/prepare_data.py --megabytes 32 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tinytf.data import Corpus, available_cpus, prepare_dataset, prepare_shards
from tinytf.tokenization import CharTokenizer, train_bpe

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=SHAKESPEARE, help="text file repeated into the corpus")
    parser.add_argument("--megabytes", type=float, default=8.0, help="size of the corpus to prepare")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="vocabulary of the BPE trained on the corpus")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        text = args.corpus.read_text(encoding="utf-8")
        copies = max(1, round(args.megabytes * 1e6 / len(text.encode("utf-8"))))
        (scratch / "corpus").mkdir()
        for copy in range(copies):  # a folder of documents, as a real corpus is
            (scratch / "corpus" / f"{copy:04d}.txt").write_text(text, encoding="utf-8")
        corpus = Corpus(scratch / "corpus")
        megabytes = copies * len(text.encode("utf-8")) / 1e6
        print(f"corpus: {copies} copies of {args.corpus.name}, {megabytes:.1f} MB; {available_cpus()} CPUs; "
              f"load average {os.getloadavg()[0]:.2f} before timing")

        started = time.perf_counter()
        bpe = train_bpe(corpus.texts(), args.bpe_vocab)
        print(f"bpe:{args.bpe_vocab} training: {megabytes / (time.perf_counter() - started):.1f} MB/s "
              f"(vocabulary {bpe.vocab_size})")
        char = CharTokenizer.from_texts(corpus.texts())

        print(f"{'tokenizer':<12} {'preparation':<28} {'MB/s':>8}")
        started = time.perf_counter()
        prepare_dataset(corpus.text(), scratch / "in-memory", tokenizer=char)
        print(f"{'char':<12} {'prepare_dataset (in memory)':<28} {megabytes / (time.perf_counter() - started):8.1f}")
        for name, tokenizer in (("char", char), (f"bpe:{args.bpe_vocab}", bpe)):
            for workers in args.workers:
                started = time.perf_counter()
                prepare_shards(corpus, scratch / f"{name}-{workers}", tokenizer, workers=workers, progress=False)
                rate = megabytes / (time.perf_counter() - started)
                print(f"{name:<12} {f'prepare_shards, {workers} worker(s)':<28} {rate:8.1f}")
        print(f"load average {os.getloadavg()[0]:.2f} after timing")


if __name__ == "__main__":
    main()
