"""Greedy generation on the CPU: tinytf's KV cache against transformers' generate(), on the same GPT-2 checkpoint.

A GPT-2-small-sized model (12 layers, width 768, 12 heads, vocabulary 50,257) with random weights is built by
transformers from its config (no download) and saved to a temporary folder; both libraries load that folder and
generate the same greedy continuation of a 16-token prompt at batch 1. Also timed: loading the folder.

    python bench/hf_generate.py [--new-tokens 200] [--repeats 3] [--threads 1]

Needs the interop extra (torch, transformers). Runs alternate between the libraries so that noise on a shared
machine hits both alike; medians are reported. Both libraries spend most of a step in BLAS matrix-vector products
that read every weight once (memory-bound); --threads sets the BLAS threads of both.
"""

import argparse
import os
import statistics
import tempfile
import time


def median_seconds(runs: list[float]) -> str:
    return f"{statistics.median(runs):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per run")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="length of the random prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads of both (default: their choice)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # this benchmark never downloads
    if args.threads:  # read by NumPy's OpenBLAS and by torch when they load, so set before importing them
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(args.threads)

    import numpy as np
    import torch
    import transformers

    import tinytf
    from tinytf.interop import from_pretrained

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # GPT-2 small's sizes
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_tokens))

    with tempfile.TemporaryDirectory() as folder:
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        load = {"tinytf": [], "transformers": []}
        generate = {"tinytf": [], "transformers": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            model = from_pretrained(folder)
            load["tinytf"].append(time.perf_counter() - start)
            start = time.perf_counter()
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
            load["transformers"].append(time.perf_counter() - start)

            start = time.perf_counter()
            ours = model.generate(prompt, args.new_tokens, temperature=0).data
            generate["tinytf"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                theirs = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=args.new_tokens, do_sample=False)
            generate["transformers"].append(time.perf_counter() - start)
            same = np.array_equal(ours, theirs.numpy())
            parameters = model.num_parameters()
            del model, hf_model

    print(f"GPT-2 small ({parameters / 1e6:.0f}M "
          f"parameters, random weights), batch 1, greedy, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, {args.repeats} runs each, medians; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, tinytf {tinytf.__version__}")
    print(f"{'':14}{'load':>10}{'generate':>12}{'tokens/s':>10}")
    for library in ("tinytf", "transformers"):
        tokens_per_second = args.new_tokens / statistics.median(generate[library])
        print(f"{library:14}{median_seconds(load[library]):>10}{median_seconds(generate[library]):>12}"
              f"{tokens_per_second:>10.1f}")
    ratio = statistics.median(generate["transformers"]) / statistics.median(generate["tinytf"])
    print(f"tinytf generates {ratio:.2f}x as fast as transformers; same tokens: {same}")


if __name__ == "__main__":
    main()
