import pytest

import tinytf
from tinytf.tensor import Function
from tinytf.testing import GradcheckError, gradcheck


class _WrongSquare(Function):
    """x^2 with a deliberately wrong backward (3x instead of 2x), to prove gradcheck can fail."""

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, grad):
        (x,) = self.saved_tensors
        return grad * 3 * x


def test_gradcheck_passes_correct_gradients():
    assert gradcheck(lambda x: (x * x).sum(), tinytf.randn(4, 3, requires_grad=True))


def test_gradcheck_reports_the_worst_element():
    x = tinytf.tensor([[1.0, -2.0], [4.0, 0.5]], requires_grad=True)
    with pytest.raises(GradcheckError, match=r"input 0 at index \(1, 0\): analytic gradient .* numeric .*4 of 4"):
        gradcheck(lambda x: _WrongSquare.apply(x), x)


def test_gradcheck_catches_errors_in_large_inputs_through_random_directions():
    x = tinytf.randn(2000, requires_grad=True)

    class WrongOnOneElement(Function):
        def forward(self, a):
            return a * 2

        def backward(self, grad):
            wrong = grad * 2
            wrong[1234] += 1.0
            return wrong

    with pytest.raises(GradcheckError):
        gradcheck(lambda a: WrongOnOneElement.apply(a), x, max_elements=8)


def test_gradcheck_needs_an_input_that_requires_grad():
    with pytest.raises(ValueError, match="requires_grad=True"):
        gradcheck(lambda x: x * 2, tinytf.randn(3))
