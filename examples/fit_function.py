"""Fit y = sin(x) on [-pi, pi] with a two-layer MLP, using only tinytf's tensors and autograd.

    python examples/fit_function.py
"""

import math

import tinytf
import tinytf.nn.functional as F

tinytf.manual_seed(0)
x = tinytf.arange(-math.pi, math.pi, 0.05).reshape(-1, 1)
y = x.sin()

hidden = 32
w1 = (tinytf.randn(hidden, 1) * 1.0).requires_grad_()
b1 = tinytf.zeros(hidden, requires_grad=True)
w2 = (tinytf.randn(1, hidden) * (1 / math.sqrt(hidden))).requires_grad_()
b2 = tinytf.zeros(1, requires_grad=True)
parameters = [w1, b1, w2, b2]

learning_rate = 0.05
for step in range(2001):
    prediction = F.linear(F.tanh(F.linear(x, w1, b1)), w2, b2)
    loss = ((prediction - y) ** 2).mean()
    for p in parameters:
        p.grad = None
    loss.backward()
    with tinytf.no_grad():
        for p in parameters:
            p.data -= learning_rate * p.grad
    if step % 400 == 0:
        print(f"step {step:4d}  mean squared error {loss.item():.5f}")

print(f"final mean squared error {loss.item():.5f} (sin has variance 0.5; an untrained model is far above 0.01)")
