"""Plain eager PyTorch twins of tinytf's two decoder presets, for the comparisons in bench/suite.py.

The model is nanoGPT's model.py with Llama's parts added, written the way one would write it in PyTorch: nn.Linear,
nn.LayerNorm / nn.RMSNorm, F.scaled_dot_product_attention (with enable_gqa for grouped-query heads), tanh GELU or
SwiGLU, rotate-half RoPE, tied embeddings, GPT-2's init. It reads its shapes from a tinytf `GPTConfig` (or any object
with the same fields), so both frameworks always build the same architecture; parameter names match tinytf's, so
`load_tinytf_state` can copy a tinytf model's weights in for an exactness check. The training recipe is nanoGPT's too:
AdamW (decay on 2-D weights only, fused=False, foreach left at its default), warmup + cosine schedule, clipping.

    python bench/torch_reference.py --data FILE --out DIR [--preset gpt2|llama] [--iters 2000] [--threads N]
        train the CPU shakespeare_char configuration exactly as `python -m tinytf.train` does (same flags and
        defaults, same batches: the data pipeline is tinytf's NumPy one) and write DIR/metrics.jsonl
    python bench/torch_reference.py --check
        build both presets in both frameworks with the same weights and compare loss, gradients and one AdamW step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# --- model -----------------------------------------------------------------------------------------------------------
def rotary_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_positions, head_dim): angle p * theta^(-2i/D), repeated for both halves (rotate-half)."""
    inverse_frequency = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by positions given as rows of cos/sin (T, D): x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """One layer's keys and values (B, Hkv, max_length, D), preallocated; decoding appends, never recomputes."""

    def __init__(self, batch_size: int, n_kv_head: int, max_length: int, head_dim: int, dtype=torch.float32):
        self.keys = torch.zeros(batch_size, n_kv_head, max_length, head_dim, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        self.c_attn = nn.Linear(config.n_embd, (H + 2 * Hkv) * D, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.rope = config.pos == "rope"
        if self.rope:
            cos, sin = rotary_tables(D, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        start = kv_cache.length if kv_cache is not None else 0
        if self.rope:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, S, D), S = start + T
        # SDPA's is_causal aligns the mask top-left, right only when T == S; one new token sees every cached key.
        if start == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False
        else:
            S = start + T
            mask, causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)
        return self.c_proj(y)


class MLP(nn.Module):
    """GPT-2: c_proj(gelu_tanh(c_fc(x))). Llama (SwiGLU): c_proj(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
            self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        else:
            self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.c_proj(F.silu(self.gate(x)) * self.up(x))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def make_norm(config) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.attn = make_norm(config), CausalSelfAttention(config)
        self.norm2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.dropout:
            raise ValueError("the reference model has no dropout; benchmark with dropout=0")
        if config.pos not in ("learned", "rope"):
            raise ValueError(f"the reference model supports learned and rope positions, not {config.pos!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # GPT-2's init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 n_layer); norms stay at 1.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif parameter.dim() == 2:
                nn.init.normal_(parameter, 0.0, residual_std if name.endswith("c_proj.weight") else 0.02)

    def hidden_states(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, C)."""
        start = kv_caches[0].length if kv_caches else 0
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + idx.shape[1]))
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_caches[layer] if kv_caches else None)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits (B, T, vocab), mean cross-entropy against targets (B, T) or None)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    def make_kv_caches(self, batch_size: int) -> list[KVCache]:
        config = self.config
        head_dim = config.head_dim or config.n_embd // config.n_head
        return [KVCache(batch_size, config.n_kv_head, config.block_size, head_dim) for _ in range(config.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 use_cache: bool = True) -> torch.Tensor:
        """The context (B, T) followed by max_new_tokens tokens; temperature 0 is greedy. As tinytf's generate: with
        the cache each step feeds only the new token, and once the context outgrows block_size the cache is refilled
        from the last block_size tokens; without it, every step runs the whole (cropped) context."""
        block = self.config.block_size
        caches, fed = None, idx[:, -block:]
        for _ in range(max_new_tokens):
            if use_cache:
                if caches is None or caches[0].length + fed.shape[1] > block:
                    caches, fed = self.make_kv_caches(idx.shape[0]), idx[:, -block:]
                hidden = self.hidden_states(fed, caches)
            else:
                hidden = self.hidden_states(idx[:, -block:])
            logits = self.lm_head(hidden[:, -1, :])  # only the last position predicts the next token
            if temperature == 0:
                next_ids = logits.argmax(dim=-1, keepdim=True)
            else:
                next_ids = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_ids], dim=1)
            fed = next_ids
        return idx


def load_tinytf_state(model: GPT, state: dict) -> None:
    """Copy a tinytf `state_dict()` (name -> NumPy array) into `model`; the names are the same by construction."""
    own = dict(model.named_parameters())
    missing = set(own) - set(state)
    if missing:
        raise KeyError(f"the tinytf state lacks {sorted(missing)}")
    with torch.no_grad():
        for name, parameter in own.items():
            parameter.copy_(torch.from_numpy(state[name]))


# --- training --------------------------------------------------------------------------------------------------------
def make_optimizer(model: GPT, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: decay the 2-D weights (matrices, embeddings), not biases or norm gains."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=False)


def lr_at(iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine decay to min_lr."""
    if iteration < warmup_iters:
        return lr * (iteration + 1) / (warmup_iters + 1)
    if iteration >= decay_iters:
        return min_lr
    progress = (iteration - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               grad_clip: float) -> float:
    """One step as tinytf.train takes it: forward, loss to Python, backward, clip, AdamW. Returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, loss = model(x, y)
    loss_value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss_value


@torch.no_grad()
def estimate_loss(model: GPT, sampler, eval_iters: int) -> dict[str, float]:
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = 0.0
        for _ in range(eval_iters):
            x, y = (torch.from_numpy(a) for a in sampler.get_batch(split))
            total += model(x, y)[1].item()
        losses[split] = total / eval_iters
    model.train()
    return losses


def train(args: argparse.Namespace) -> dict:
    """nanoGPT's training loop on tinytf's data pipeline (same tokenizer, split and seeded batches as tinytf.train)."""
    from tinytf.data import BatchSampler, prepare_dataset, read_text
    from tinytf.models.gpt import GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(read_text(args.data), args.out / "data")
    config = GPTConfig.from_preset(args.preset, vocab_size=dataset.tokenizer.vocab_size, n_layer=args.n_layer,
                                   n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    model = GPT(config)
    optimizer = make_optimizer(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
    warmup_iters = args.warmup_iters if args.warmup_iters is not None else min(100, args.iters // 20)
    samplers = {"train": BatchSampler(dataset.splits, args.batch_size, config.block_size, seed=args.seed),
                "eval": BatchSampler(dataset.splits, args.batch_size, config.block_size, seed=args.seed + 1)}
    metrics_path = args.out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {args.preset}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    started = time.perf_counter()
    record = {}
    for iteration in range(args.iters):
        lr = lr_at(iteration, args.lr, args.min_lr, warmup_iters, args.iters)
        x, y = (torch.from_numpy(a) for a in samplers["train"].get_batch("train"))
        train_step(model, optimizer, x, y, lr, args.grad_clip)
        if (iteration + 1) % args.eval_interval == 0 or iteration == args.iters - 1:
            now = time.perf_counter()
            losses = estimate_loss(model, samplers["eval"], args.eval_iters)
            record = {"iter": iteration + 1, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                      "elapsed_s": now - started}
            with open(metrics_path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            # nanoGPT checkpoints at every evaluation; so does tinytf.train, so the wall times stay comparable.
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": iteration + 1},
                       args.out / "ckpt.pt")
            print(f"iter {iteration + 1}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
    print(f"done: {args.iters} iterations in {time.perf_counter() - started:.1f} s", flush=True)
    return record


# --- autograd overhead -----------------------------------------------------------------------------------------------
def autograd_chain(x0, a: float, b: float, steps: int):
    """bench/autograd_overhead.py's chain (y = y * a + b, `steps` times, then sum().backward()) in torch."""
    x = torch.tensor(x0, requires_grad=True)
    y = x
    for _ in range(steps):
        y = y * a + b
    y.sum().backward()
    return x.grad


# --- exactness check -------------------------------------------------------------------------------------------------
def check() -> int:
    """Same weights in both frameworks: loss, gradients and parameters after one clipped AdamW step must agree."""
    import numpy as np

    import tinytf
    from tinytf.models.gpt import GPT as TinyGPT, GPTConfig
    from tinytf.optim import AdamW, clip_grad_norm_, weight_decay_groups

    # Both libraries' thread pools in one process fight over the cores (each spins while the other works), which
    # makes small matrix products 10x slower; one thread each keeps this check quick. It times nothing.
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        pass
    worst = 0.0
    for preset in ("gpt2", "llama"):
        tinytf.manual_seed(0)
        config = GPTConfig.from_preset(preset, vocab_size=65, block_size=64)
        tiny = TinyGPT(config)
        reference = GPT(config)
        load_tinytf_state(reference, tiny.state_dict())
        rng = np.random.default_rng(0)
        x, y = (rng.integers(0, 65, (4, 64)) for _ in range(2))

        _, tiny_loss = tiny(x, y)
        optimizer = AdamW(weight_decay_groups(tiny.parameters(), 0.1), lr=1e-3, betas=(0.9, 0.99))
        optimizer.zero_grad()
        tiny_loss.backward()
        clip_grad_norm_(tiny.parameters(), 1.0)
        tiny_grads = {name: p.grad.copy() for name, p in tiny.named_parameters()}
        optimizer.step()

        torch_optimizer = make_optimizer(reference, 1e-3, (0.9, 0.99), 0.1)
        _, torch_loss = reference(torch.from_numpy(x), torch.from_numpy(y))
        torch_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
        torch_optimizer.step()

        own = dict(reference.named_parameters())
        gradient_error = max(float(np.abs(tiny_grads[n] - torch_grads[n].numpy()).max()) for n in tiny_grads)
        parameter_error = max(float(np.abs(p.data - own[n].detach().numpy()).max())
                              for n, p in tiny.named_parameters())
        loss_error = abs(tiny_loss.item() - torch_loss.item())

        prompt = rng.integers(0, 65, (2, 5))
        tiny_tokens = tiny.generate(prompt, 80, temperature=0).data  # 80 > block 64: the cache refills
        same_generation = all(
            np.array_equal(tiny_tokens, reference.generate(torch.from_numpy(prompt), 80, use_cache=c).numpy())
            for c in (True, False))
        print(f"{preset}: loss {tiny_loss.item():.6f} vs {torch_loss.item():.6f}, max |grad diff| "
              f"{gradient_error:.2e}, max |param diff| after a step {parameter_error:.2e}, "
              f"greedy generation identical (cached and not): {same_generation}")
        worst = max(worst, loss_error, gradient_error, parameter_error)
        if not same_generation:
            worst = math.inf
    ok = worst < 1e-4
    print("OK: the reference computes what tinytf computes" if ok else "MISMATCH")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare against tinytf on the same weights and exit")
    parser.add_argument("--data", type=Path, help="UTF-8 text file to train on")
    parser.add_argument("--out", type=Path, default=Path("out-torch"), help="folder for data, checkpoint, metrics")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--preset", choices=("gpt2", "llama"), default="gpt2")
    for flag, default in (("n-layer", 4), ("n-head", 4), ("n-embd", 128), ("block-size", 64), ("batch-size", 12),
                          ("iters", 2000), ("eval-interval", 250), ("eval-iters", 20), ("seed", 1337)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--warmup-iters", type=int, default=None, help="default: 100, or iters // 20 if fewer")
    for flag, default in (("lr", 1e-3), ("min-lr", 1e-4), ("weight-decay", 0.1), ("beta1", 0.9), ("beta2", 0.99),
                          ("grad-clip", 1.0)):
        parser.add_argument(f"--{flag}", type=float, default=default)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        return check()
    if args.data is None:
        print("torch_reference.py: error: --data is required for training (or pass --check)", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
