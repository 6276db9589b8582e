"""Matrix products: matmul with NumPy's batching and 1-D rules, the fused linear layer, and einsum (with outer)."""

from __future__ import annotations

import string

from .. import backend
from ..tensor import Function, Tensor
from .common import computes_in_float32, sum_to


@computes_in_float32
class MatMul(Function):
    def forward(self, a, b):
        """(..., n, k) @ (..., k, m) -> (..., n, m); a 1-D operand is a row (left) or a column (right) vector."""
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, grad):
        a, b = self.saved_tensors
        # Treat vectors as matrices so one formula serves every case: dA = G B^T, dB = A^T G.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if b.ndim == 1:
            grad = grad[..., None]
        if a.ndim == 1:
            grad = grad[..., None, :]
        grad_a = grad_b = None
        if self.needs_input_grad[0]:
            grad_a = sum_to(grad @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            grad_b = sum_to(a2.swapaxes(-1, -2) @ grad, b2.shape).reshape(b.shape)
        return grad_a, grad_b


def matmul(a: Tensor, b: Tensor) -> Tensor:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: both operands need at least one dimension, got shapes {a.shape} and {b.shape}")
    inner_a = a.shape[-1]
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if inner_a != inner_b:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: inner dimensions {inner_a} and {inner_b} differ")
    batch_a, batch_b = a.shape[:-2], b.shape[:-2]
    try:
        backend.get_array_module(a.data).broadcast_shapes(batch_a, batch_b)
    except ValueError:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: batch dimensions {batch_a} and {batch_b} do not broadcast") from None
    return MatMul.apply(a, b)


@computes_in_float32
class Linear(Function):
    def forward(self, x, weight, bias=None):
        """(..., in) @ (out, in)^T + (out,) -> (..., out)"""
        # One GEMM over all leading dimensions: (N, in) @ (in, out), with N = prod(leading).
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight.T
        if bias is not None:
            out += bias
        self.save_for_backward(x2, weight)
        self.input_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x2, weight = self.saved_tensors
        grad2 = grad.reshape(-1, weight.shape[0])
        grad_x = (grad2 @ weight).reshape(self.input_shape) if self.needs_input_grad[0] else None
        grad_weight = grad2.T @ x2 if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return grad_x, grad_weight
        grad_bias = grad2.sum(axis=0) if self.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, with W of shape (out_features, in_features) as in PyTorch."""
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
            f"(expected input (..., {weight.shape[1] if weight.ndim == 2 else '?'}))"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias of shape {bias.shape}, expected ({weight.shape[0]},)")
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


LETTERS = string.ascii_uppercase + string.ascii_lowercase


def _parse_einsum(equation: str, shapes: list[tuple[int, ...]]) -> tuple[list[str], str]:
    """The subscripts of each operand and of the output, with every '...' spelled out as letters the equation does
    not use (aligned from the right, as broadcasting is), and the implicit output (letters used once, sorted) made
    explicit."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum: the equation {equation!r} names {len(terms)} operands, got {len(shapes)}")
    for term in terms + [output]:
        if any(char not in LETTERS for char in term.replace("...", "")):
            raise ValueError(f"einsum: subscripts must be letters (and '...'), got {term!r} in {equation!r}")
    # Each '...' stands for the last letters of one run of letters the equation does not use, as many as its operand
    # needs: the run is as long as the most any operand needs, so the letters line up from the right.
    own_dims = [len(shape) - len(term.replace("...", "")) for term, shape in zip(terms, shapes)]
    for term, shape, own in zip(terms, shapes, own_dims):
        if own < 0 or ("..." not in term and own != 0):
            raise ValueError(f"einsum: subscripts {term!r} do not fit an operand of shape {shape}")
    unused = [char for char in LETTERS if char not in equation]
    broadcast = "".join(unused[: max(own_dims, default=0)])
    terms = [term.replace("...", broadcast[len(broadcast) - own :]) for term, own in zip(terms, own_dims)]
    if not arrow:
        once = sorted(char for char in set("".join(terms)) if "".join(terms).count(char) == 1 and char not in broadcast)
        output = broadcast + "".join(once)
    else:
        output = output.replace("...", broadcast)
    if len(set(output)) != len(output) or any(char not in "".join(terms) for char in output):
        raise ValueError(f"einsum: each output subscript must appear once and in an operand, got {equation!r}")
    return terms, output


def _letter_sizes(terms: list[str], shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """The size of each letter; a size 1 broadcasts against a larger one, other mismatches are errors."""
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        for char, size in zip(term, shape):
            known = sizes.get(char, size)
            if size != known and 1 not in (size, known):
                raise ValueError(f"einsum: subscript {char} has sizes {known} and {size}")
            sizes[char] = size if known == 1 else known
    return sizes


@computes_in_float32
class Einsum(Function):
    def forward(self, *operands, terms: list[str], output: str, sizes: dict[str, int]):
        """operands with subscripts `terms` -> subscripts `output`: products summed over the letters not kept"""
        self.terms, self.output, self.sizes = terms, output, sizes
        self.save_for_backward(*operands)
        xp = backend.get_array_module(*operands)
        return xp.einsum(",".join(terms) + "->" + output, *operands, optimize=True)  # BLAS for pairs, a good order

    def backward(self, grad):
        """The gradient of operand i is the einsum of the output's gradient with the other operands, into operand i's
        subscripts. A letter only operand i has gets a vector of ones (its gradient is constant along it); a letter
        operand i repeats (a diagonal) is renamed on each repeat and tied to the first by an identity matrix, so the
        gradient lands on that diagonal and is zero off it."""
        operands = self.saved_tensors
        xp = backend.get_array_module(grad, *operands)
        sizes = self.sizes
        grads = []
        for i, (term, operand) in enumerate(zip(self.terms, operands)):
            if not self.needs_input_grad[i]:
                grads.append(None)
                continue
            others = [t for k, t in enumerate(self.terms) if k != i]
            reached = set(self.output).union(*others)
            inputs = [self.output] + others
            arrays = [grad] + [op for k, op in enumerate(operands) if k != i]
            spare = iter(char for char in LETTERS if char not in sizes)
            target = ""
            for char in term:
                if char in target:  # a repeat: a fresh letter, equal to `char` through an identity matrix
                    fresh = next(spare)
                    inputs.append(char + fresh)
                    arrays.append(xp.eye(sizes[char], dtype=grad.dtype))
                    char = fresh
                elif char not in reached:
                    inputs.append(char)
                    arrays.append(xp.ones(sizes[char], dtype=grad.dtype))
                target += char
            result = xp.einsum(",".join(inputs) + "->" + target, *arrays, optimize=True)
            # A letter of size 1 here and n elsewhere (broadcast): the gradient sums over the n; the other way round,
            # it is the same for every one of the operand's n.
            grown = xp.broadcast_to(result, tuple(max(r, n) for r, n in zip(result.shape, operand.shape)))
            grads.append(sum_to(grown, operand.shape))
        return tuple(grads)


def einsum(equation: str, *operands) -> Tensor:
    """torch.einsum: `einsum("bij,bjk->bik", a, b)`; operands may also come as one list. Supports '...', implicit
    output, broadcasting of size-1 dimensions, and repeated subscripts in one operand (diagonals)."""
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])
    shapes = [op.shape for op in operands]
    terms, output = _parse_einsum(equation, shapes)
    return Einsum.apply(*operands, terms=terms, output=output, sizes=_letter_sizes(terms, shapes))


def outer(a: Tensor, b: Tensor) -> Tensor:
    """(n,), (m,) -> (n, m): a[i] * b[j]."""
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"outer: needs two 1-D tensors, got shapes {a.shape} and {b.shape}")
    return einsum("i,j->ij", a, b)
