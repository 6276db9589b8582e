"""What the tests of the training command share: a tiny model's flags, a corpus, running the CLI in-process, its
metrics, and a stand-in for Ctrl-C."""

import json

import tinytf.train as train_module

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--seed", "7"]


def write_corpus(path, word="line"):
    """300 lines of one sentence, numbered after `word`: other words give other vocabularies."""
    path.write_text("".join(f"{word} {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)),
                    encoding="utf-8")
    return path


def run_tiny(*args) -> int:
    """tinytf.train's exit status for the tiny model and `args`."""
    return train_module.main([*TINY, *map(str, args)])


def metrics(folder) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class StopAfter:
    """Stands in for tinytf.train.StopRequest (Ctrl-C): asks the loop to stop once `steps` steps have completed."""

    def __init__(self, steps):
        self.steps, self.checks = steps, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= self.steps
